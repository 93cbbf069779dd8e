"""Latency and memory of VTW against the unpatched model, measured in one interleaved run.

Machines are noisy, so every configuration is measured in turn within each repeat (baseline, K1, K2, ... then
again) and medians are reported, next to the analytic FLOPs ratio that the measured speedup should approach.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.families import family_for
from vtexit.core.flops import DecoderShape, FlopsCount, flops_per_row
from vtexit.core.transformers_compat import kv_bytes_per_layer, output_cache
from vtexit.evaluation.speed import time_call
from vtexit.evaluation.timing import CallTimer
from vtexit.methods.vtw import withdraw


@dataclass(frozen=True)
class BenchRow:
    """One configuration: ``layer`` None is the unpatched baseline."""

    layer: int | None
    prefill_s: float  # whole model forward (vision tower included)
    lm_prefill_s: float  # the language model's part of it: what the FLOPs count covers
    generate_s: float
    decode_token_s: float  # median over every decode step of the language model's time
    kv_bytes_per_layer: tuple[int, ...]
    prefill_flops: int
    decode_flops: int
    repeats: int | None = None  # timed repeats the medians are over (None: not recorded)

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    def kv_bytes_from(self, layer: int) -> int:
        """KV bytes held by layers ``layer..N-1`` (the withdrawn layers of VTW at that K)."""
        return sum(self.kv_bytes_per_layer[layer:])

    @property
    def label(self) -> str:
        return "baseline" if self.layer is None else f"VTW K={self.layer}"


def _timed(fn, device: torch.device) -> float:
    return time_call(fn, device)


@torch.no_grad()
def bench_withdrawal(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    *,
    repeats: int = 5,
    new_tokens: int = 32,
    warmup: int = 1,
    progress: bool = True,
) -> list[BenchRow]:
    """Median prefill latency, generate latency, per-token decode time and KV bytes for each K (and baseline).

    Prefill and decode steps are also timed inside the language model alone (hooks), which is what the FLOPs
    count covers and gives one decode sample per generated token.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to separate decode from prefill, got {new_tokens}")
    configs: list[int | None] = [None, *layers]
    family = family_for(model)
    shape = DecoderShape.from_model(model)
    device = inputs["input_ids"].device
    gen_kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    samples: dict[int | None, dict[str, list[float]]] = {
        c: {"prefill": [], "lm": [], "gen": [], "decode": []} for c in configs
    }
    language_model = family.resolve(model).language_model
    kv: dict[int | None, tuple[int, ...]] = {}
    flops: dict[int | None, FlopsCount] = {}

    def measure(config: int | None, record: bool) -> None:
        handle = withdraw(model, layer=config) if config is not None else None
        try:
            with CallTimer(language_model) as lm_timer:
                prefill = _timed(lambda: model(**inputs, use_cache=True), device)
            with CallTimer(language_model) as steps:
                gen = _timed(lambda: model.generate(**inputs, **gen_kwargs), device)
            if config not in flops:
                rows = flops_per_row(shape, handle.last_cost if handle is not None else None, inputs)
                flops[config] = FlopsCount(sum(r.prefill for r in rows), sum(r.decode_per_token for r in rows))
            if record:
                samples[config]["prefill"].append(prefill)
                samples[config]["lm"].append(lm_timer.durations[0])
                samples[config]["gen"].append(gen)
                samples[config]["decode"].extend(steps.durations[1:])  # [0] is the prefill
                if config not in kv:
                    cache = output_cache(model(**inputs, use_cache=True))
                    kv[config] = kv_bytes_per_layer(cache)
        finally:
            if handle is not None:
                handle.remove()

    total = (warmup + repeats) * len(configs)
    with tqdm(total=total, desc="benchmark", unit="run", disable=not progress) as bar:
        for r in range(warmup + repeats):
            for config in configs:
                measure(config, record=r >= warmup)
                bar.update()
    rows = []
    for config in configs:
        s = samples[config]
        rows.append(
            BenchRow(
                layer=config,
                prefill_s=statistics.median(s["prefill"]),
                lm_prefill_s=statistics.median(s["lm"]),
                generate_s=statistics.median(s["gen"]),
                decode_token_s=statistics.median(s["decode"]),
                kv_bytes_per_layer=kv[config],
                prefill_flops=flops[config].prefill,
                decode_flops=flops[config].decode_per_token,
                repeats=repeats,
            )
        )
    return rows
