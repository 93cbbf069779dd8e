"""Wall-clock speed of withdrawal on the hardware at hand (GPU or CPU), eager and compiled, against the same
configuration without vtexit, in one run.

Timing synchronises the device around every timed call (CUDA events on GPUs), so the numbers are the device's, not
the host's enqueue time. Eager configurations are interleaved within each repeat; a compiled configuration is timed
in a block of its own after a warm-up, because patching and removing make a compiled model trace again.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from vtexit.core.families import family_for
from vtexit.core.flops import DecoderShape, flops_per_row
from vtexit.core.transformers_compat import compiled_decode_config, kv_bytes_per_layer, output_cache
from vtexit.methods.base import MethodConfig
from vtexit.methods.patch import apply
from vtexit.methods.vtw import withdraw

NOISE_MARGIN = 1.10  # a speedup above 1.10 x the FLOPs ratio is reported as noise
# Compile modes the benchmark times, by the name its rows carry: the whole model (inductor's default; or with CUDA
# graphs, ``mode="reduce-overhead"``), or each decoder layer's forward (vtexit's hooks then run between graphs).
COMPILE_MODES = {"whole": "compiled", "reduce-overhead": "cudagraphs", "regional": "regional"}


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes on ``device``: CUDA events on a GPU, a plain clock on the CPU (both synchronised)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    import time

    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def resident_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (tied tensors once)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def call_peak_bytes(fn: Callable[[], object], model: nn.Module, device: torch.device) -> int:
    """Peak CUDA memory of ``model`` running ``fn``: its own weights plus the most the call allocated on top of what
    was resident before it. Other models' weights on the device (the benchmark's patched copies) and memory kept
    between calls (compiled graphs' pools) are left out, so a model's peak is comparable whatever else the process
    holds."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + resident_bytes(model)


def cudagraph_skips() -> int:
    """Compiled graphs so far that inductor ran without CUDA graphs although asked to (``mode="reduce-overhead"``;
    on the CPU every one)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


@dataclass(frozen=True)
class SpeedRow:
    """One configuration: ``layer`` None is the model without vtexit."""

    mode: str  # "eager" | one of COMPILE_MODES' names
    layer: int | None
    prefill_s: float  # median forward without cache, last-token logits only
    decode_token_s: float | None  # median ms per generated token (dynamic cache), eager only
    peak_bytes: int | None  # peak CUDA memory of a generate (see call_peak_bytes; None on the CPU)
    prefill_flops: int
    kv_bytes: int | None = None  # bytes of the dynamic cache's keys and values after a generate, eager only
    cudagraph_skips: int | None = None  # "reduce-overhead": compiled graphs of its warm-up run without CUDA graphs

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    *,
    repeats: int = 5,
    new_tokens: int = 16,
    compiled: bool = False,
    compile_backend: str = "inductor",
    compile_mode: str | Sequence[str] = "whole",
) -> list[SpeedRow]:
    """Prefill (and, eager, decode, peak memory and KV bytes held) for the model without vtexit and VTW at each K.

    ``compile_mode`` (one or several, timed when ``compiled``): "whole" times ``torch.compile(model)``,
    "reduce-overhead" the same with CUDA graphs, "regional" compiles each decoder layer's forward (vtexit's hooks
    then run eagerly between compiled layers, with no graph break inside a compiled region)."""
    modes = [compile_mode] if isinstance(compile_mode, str) else list(compile_mode)
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown or not modes:
        raise ValueError(f"compile_mode must be among {sorted(COMPILE_MODES)}, got {compile_mode!r}")
    device = inputs["input_ids"].device
    shape = DecoderShape.from_model(model)
    configs: list[int | None] = [None, *layers]
    forward = dict(use_cache=False, logits_to_keep=1)
    generate, first_token = greedy_generate_kwargs(new_tokens), greedy_generate_kwargs(1)
    prefill: dict[int | None, list[float]] = {c: [] for c in configs}
    decode: dict[int | None, list[float]] = {c: [] for c in configs}
    peak: dict[int | None, int | None] = {}
    kv: dict[int | None, int] = {}
    flops: dict[int | None, int] = {}
    for r in range(repeats + 1):  # the first round warms up
        for config in configs:
            handle = withdraw(model, layer=config) if config is not None else None
            try:
                seconds = time_call(lambda: model(**inputs, **forward), device)
                if config not in flops:
                    run = handle.last_cost if handle is not None else None
                    flops[config] = sum(r.prefill for r in flops_per_row(shape, run, inputs))
                    out = model.generate(**inputs, **generate, return_dict_in_generate=True)
                    kv[config] = sum(kv_bytes_per_layer(output_cache(out)))
                    del out
                    if device.type == "cuda":
                        peak[config] = call_peak_bytes(lambda: model.generate(**inputs, **generate), model, device)
                short = time_call(lambda: model.generate(**inputs, **first_token), device)
                full = time_call(lambda: model.generate(**inputs, **generate), device)
            finally:
                if handle is not None:
                    handle.remove()
            if r > 0:
                prefill[config].append(seconds)
                decode[config].append((full - short) / (new_tokens - 1))
    rows = [
        SpeedRow("eager", c, statistics.median(prefill[c]), statistics.median(decode[c]), peak.get(c), flops[c], kv[c])
        for c in configs
    ]
    if compiled:
        for mode in modes:
            rows += _compiled_rows(model, inputs, configs, repeats, forward, flops, compile_backend, mode)
    return rows


def _compiled_rows(model, inputs, configs, repeats, forward, flops, backend, mode) -> list[SpeedRow]:
    device = inputs["input_ids"].device
    rows = []
    layers = list(family_for(model).resolve(model).layers) if mode == "regional" else []
    for layer in layers:
        # Static shapes: after a withdrawal the layers see a second sequence length, and automatic dynamic shapes
        # would then recompile every layer (those before K too) to one dynamic-length graph the baseline never used.
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=False)
    options = dict(mode="reduce-overhead") if mode == "reduce-overhead" else {}
    compiled = model if mode == "regional" else torch.compile(model, backend=backend, **options)
    try:
        for config in configs:
            handle = withdraw(model, layer=config) if config is not None else None
            try:
                before = cudagraph_skips()
                for _ in range(2):  # trace and warm up
                    compiled(**inputs, **forward)
                skips = cudagraph_skips() - before if mode == "reduce-overhead" else None
                times = [time_call(lambda: compiled(**inputs, **forward), device) for _ in range(repeats)]
            finally:
                if handle is not None:
                    handle.remove()
            rows.append(SpeedRow(COMPILE_MODES[mode], config, statistics.median(times), None, None, flops[config],
                                 cudagraph_skips=skips))
    finally:
        for layer in layers:
            del layer.forward
    return rows


@dataclass(frozen=True)
class StaticDecodeRow:
    """transformers' static cache + compiled decode: without vtexit (``layer`` and ``method`` None), under VTW at
    ``layer``, or under the method config named ``method``."""

    layer: int | None
    decode_token_s: float  # median seconds per generated token
    peak_bytes: int | None  # peak CUDA memory of a static-cache generate (see call_peak_bytes; None on the CPU)
    kv_bytes: int | None = None  # bytes of the static cache's key/value buffers after a generate
    dynamic_peak_bytes: int | None = None  # the same generate on the default dynamic cache, eager (CUDA only)
    cudagraph_skips: int = 0  # compiled graphs of its warm-up run without CUDA graphs (CUDA: should be 0)
    method: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.layer is None and self.method is None

    @property
    def label(self) -> str:
        return config_label(self.layer, self.method)


def config_label(layer: int | None, method: str | None = None) -> str:
    """How the benchmarks name a configuration: the method config's name, VTW at ``layer``, or no vtexit."""
    if method is not None:
        return method
    return "no vtexit" if layer is None else f"VTW K={layer}"


def greedy_generate_kwargs(new_tokens: int) -> dict:
    """``generate`` settings for exactly ``new_tokens`` greedy tokens (on the model's default cache)."""
    return dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)


def static_generate_kwargs(new_tokens: int) -> dict:
    """The same on a static cache with transformers' compiled decode, forced on the CPU too (transformers compiles it
    only on accelerators by default)."""
    compiled = dict(cache_implementation="static", compile_config=compiled_decode_config())
    return dict(greedy_generate_kwargs(new_tokens), **compiled)


@contextmanager
def patched_copies(
    model: nn.Module, layers: Sequence[int], methods: Mapping[str, MethodConfig] | None = None
) -> Iterator[dict[int | str | None, nn.Module]]:
    """``{None: model, K: a copy of model under VTW at K, ..., name: a copy under methods[name], ...}``, the copies
    patched before anything compiles: patching or removing a patch makes compiled graphs trace again, so each
    configuration gets a model of its own."""
    models: dict[int | str | None, nn.Module] = {None: model}
    handles = []
    try:
        for layer in layers:
            models[layer] = copy.deepcopy(model)
            handles.append(withdraw(models[layer], layer=layer))
        for name, config in (methods or {}).items():
            models[name] = copy.deepcopy(model)
            handles.append(apply(models[name], config))
        yield models
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_static_decode(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    *,
    methods: Mapping[str, MethodConfig] | None = None,
    repeats: int = 5,
    new_tokens: int = 16,
) -> list[StaticDecodeRow]:
    """Decode ms/token with ``cache_implementation="static"`` and transformers' own compiled decode (forced on the
    CPU too), for the model without vtexit, VTW at each K and each named method config, interleaved within each
    repeat; on CUDA also the peak memory of that generate and of the same generate on the dynamic cache.

    Patching or removing a patch makes every compiled graph trace again, so each K runs on a copy of the model
    patched once before anything compiles (one more copy of the weights per K, which the peaks leave out); after two
    warm-up generates per configuration nothing retraces. Per-token time is the difference between a ``new_tokens``
    and a one-token generate (the prefill cancels out)."""
    device = inputs["input_ids"].device
    full, one = static_generate_kwargs(new_tokens), static_generate_kwargs(1)
    dynamic = greedy_generate_kwargs(new_tokens)
    with patched_copies(model, layers, methods) as models:
        kv: dict[int | str | None, int] = {}
        skips: dict[int | str | None, int] = {}
        peak: dict[int | str | None, int | None] = {c: None for c in models}
        dynamic_peak: dict[int | str | None, int | None] = {c: None for c in models}
        for config, candidate in models.items():
            before = cudagraph_skips()
            for _ in range(2):
                candidate.generate(**inputs, **full)
            skips[config] = cudagraph_skips() - before
            out = candidate.generate(**inputs, **full, return_dict_in_generate=True)
            kv[config] = sum(kv_bytes_per_layer(output_cache(out)))
            del out
            if device.type == "cuda":
                peak[config] = call_peak_bytes(partial(candidate.generate, **inputs, **full), candidate, device)
                dynamic_peak[config] = call_peak_bytes(partial(candidate.generate, **inputs, **dynamic), candidate,
                                                       device)
        per_token: dict[int | str | None, list[float]] = {c: [] for c in models}
        for r in range(repeats):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for config in order:
                candidate = models[config]
                long = time_call(partial(candidate.generate, **inputs, **full), device)
                short = time_call(partial(candidate.generate, **inputs, **one), device)
                per_token[config].append((long - short) / (new_tokens - 1))
    return [
        StaticDecodeRow(
            None if isinstance(c, str) else c,
            statistics.median(per_token[c]),
            peak[c],
            kv[c],
            dynamic_peak[c],
            skips[c],
            method=c if isinstance(c, str) else None,
        )
        for c in models
    ]


def speed_ratios(rows: Sequence[SpeedRow]) -> list[dict]:
    """Per row: prefill speedup over the same mode's baseline, the FLOPs ratio, and their quotient."""
    base = {row.mode: row for row in rows if row.layer is None}
    out = []
    for row in rows:
        ref = base[row.mode]
        speedup = ref.prefill_s / row.prefill_s
        ratio = ref.prefill_flops / row.prefill_flops
        efficiency = speedup / ratio
        # Faster than the FLOPs allow is noise (load bursts, warm-up), not a result: flag it.
        out.append(dict(row.to_dict(), speedup=speedup, flops_ratio=ratio, efficiency=efficiency,
                        beyond_flops_bound=efficiency > NOISE_MARGIN))
    return out



@dataclass(frozen=True)
class MethodSpeed:
    """Median prefill time of one named configuration (``config`` None: the model without vtexit)."""

    name: str
    prefill_s: float
    prefill_flops: int
    speedup: float  # over the model without vtexit, measured in the same run
    flops_ratio: float

    @property
    def efficiency(self) -> float:
        """Speedup as a share of what the FLOPs allow (1.0: every FLOP saved became time saved)."""
        return self.speedup / self.flops_ratio


@torch.no_grad()
def measure_methods(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], configs: Mapping[str, MethodConfig], *, repeats: int = 5
) -> list[MethodSpeed]:
    """Prefill time (no cache, last-token logits) of the model without vtexit and under each method config,
    interleaved within each repeat after one warm-up round; medians, with FLOPs from the cost records."""
    device = inputs["input_ids"].device
    shape = DecoderShape.from_model(model)
    names = [None, *configs]
    times: dict[str | None, list[float]] = {n: [] for n in names}
    flops: dict[str | None, int] = {}
    for r in range(repeats + 1):
        for name in names:
            handle = apply(model, configs[name]) if name is not None else None
            try:
                seconds = time_call(lambda: model(**inputs, use_cache=False, logits_to_keep=1), device)
                run = handle.last_cost if handle is not None else None
                flops[name] = sum(row.prefill for row in flops_per_row(shape, run, inputs))
            finally:
                if handle is not None:
                    handle.remove()
            if r > 0:
                times[name].append(seconds)
    base_s, base_flops = statistics.median(times[None]), flops[None]
    out = []
    for name in names:
        median = statistics.median(times[name])
        out.append(
            MethodSpeed(name or "none", median, flops[name], base_s / median, base_flops / flops[name])
        )
    return out
