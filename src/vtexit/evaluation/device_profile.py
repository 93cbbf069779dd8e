"""Where a prefill or a decode step spends its time: the device's busy time against the wall time, per configuration.

A batch-1 prefill of a 7B model on a GPU is host-bound: the device waits between kernels, so a withdrawal that
removes FLOPs but not kernels does not show in wall time, and a decode step that runs without CUDA graphs pays a host
launch per kernel. The speed benchmark's ratios cannot tell these apart; this profile can. Per configuration it gives
the wall time (timed without the profiler), the device's busy time (the sum of its kernels' durations, from one
profiled run), the number of kernels, and the kernels that took the most time. On the CPU the "kernels" are the
top-level aten operators and there is no separate busy time.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from vtexit.evaluation.speed import config_label, patched_copies, static_generate_kwargs, time_call
from vtexit.methods.vtw import withdraw


@dataclass(frozen=True)
class KernelShare:
    """One kernel (or, on the CPU, top-level operator) name: launches and seconds, per call or per token."""

    name: str
    calls: float
    seconds: float


@dataclass(frozen=True)
class DeviceProfile:
    """One configuration (``layer`` None: without vtexit) of one kind of run."""

    run: str  # e.g. "prefill, eager" or "static decode, per token"
    layer: int | None
    wall_s: float  # median wall time, profiler off
    busy_s: float | None  # summed kernel time on the device (None on the CPU)
    kernels: float  # kernels launched (CPU: top-level aten operators)
    top: tuple[KernelShare, ...]  # the most time-consuming, largest first

    @property
    def label(self) -> str:
        return config_label(self.layer)

    @property
    def busy_share(self) -> float | None:
        """Busy time over wall time: near 1 the device is the bound; well below it the host is."""
        return None if self.busy_s is None else self.busy_s / self.wall_s


def is_top_level_op(event) -> bool:
    """A CPU-side aten operator called from Python, not from inside another operator (``mm`` inside ``linear``)."""
    if not event.name.startswith("aten::") or event.device_type != DeviceType.CPU:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def kernel_totals(fn: Callable[[], object], device: torch.device) -> dict[str, tuple[int, float]]:
    """Name -> (launches, seconds) over one profiled run of ``fn``: the device's kernels on CUDA, top-level aten
    operators on the CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        kernel = event.device_type == DeviceType.CUDA if device.type == "cuda" else is_top_level_op(event)
        if kernel:
            totals[event.name][0] += 1
            totals[event.name][1] += event.time_range.elapsed_us() / 1e6
    return {name: (calls, seconds) for name, (calls, seconds) in totals.items()}


def _profile(
    run: str,
    layer: int | None,
    device: torch.device,
    fn: Callable[[], object],
    *,
    minus: Callable[[], object] | None = None,
    per: int = 1,
    repeats: int = 3,
    top: int = 8,
) -> DeviceProfile:
    """The profile of ``fn`` (less that of ``minus``: e.g. a one-token generate, to leave the decode steps), per
    ``per`` units."""
    wall = statistics.median(
        time_call(fn, device) - (time_call(minus, device) if minus is not None else 0.0) for _ in range(repeats)
    )
    totals = kernel_totals(fn, device)
    if minus is not None:
        for name, (calls, seconds) in kernel_totals(minus, device).items():
            have_calls, have_seconds = totals.get(name, (0, 0.0))
            totals[name] = (have_calls - calls, have_seconds - seconds)
    shares = sorted(
        (KernelShare(name, calls / per, seconds / per) for name, (calls, seconds) in totals.items() if calls > 0),
        key=lambda share: share.seconds,
        reverse=True,
    )
    busy = sum(share.seconds for share in shares) if device.type == "cuda" else None
    return DeviceProfile(run, layer, wall / per, busy, sum(share.calls for share in shares), tuple(shares[:top]))


@torch.no_grad()
def profile_prefill(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    *,
    compile_mode: str | None = None,
    repeats: int = 3,
    top: int = 8,
) -> list[DeviceProfile]:
    """The prefill (no cache, last-token logits) without vtexit and under VTW at each K: eager, or compiled whole
    (``compile_mode`` "default" or "reduce-overhead", each configuration traced and warmed up before it is timed)."""
    if compile_mode not in (None, "default", "reduce-overhead"):
        raise ValueError(f"compile_mode must be None, 'default' or 'reduce-overhead', got {compile_mode!r}")
    device = inputs["input_ids"].device
    run = "prefill, " + ("eager" if compile_mode is None else f"compiled ({compile_mode})")
    forward = torch.compile(model, mode=compile_mode) if compile_mode is not None else model
    out = []
    call = partial(forward, **inputs, use_cache=False, logits_to_keep=1)
    for layer in [None, *layers]:
        with withdraw(model, layer=layer) if layer is not None else nullcontext():
            for _ in range(3):  # trace, record CUDA graphs, warm up
                call()
            out.append(_profile(run, layer, device, call, repeats=repeats, top=top))
    return out


@torch.no_grad()
def profile_static_decode(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    *,
    new_tokens: int = 16,
    repeats: int = 3,
    top: int = 8,
) -> list[DeviceProfile]:
    """Per decode token, on transformers' static cache with its compiled decode (CUDA graphs on a GPU): without
    vtexit and under VTW at each K (each on its own patched copy, as :func:`measure_static_decode` times them); the
    profile of a ``new_tokens`` generate less that of a one-token generate."""
    device = inputs["input_ids"].device
    full, one = static_generate_kwargs(new_tokens), static_generate_kwargs(1)
    out = []
    with patched_copies(model, layers) as models:
        for layer, candidate in models.items():
            long, short = partial(candidate.generate, **inputs, **full), partial(candidate.generate, **inputs, **one)
            for _ in range(2):
                long()
            out.append(
                _profile("static decode, per token", layer, device, long, minus=short, per=new_tokens - 1,
                         repeats=repeats, top=top)
            )
    return out
