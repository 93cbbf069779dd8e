"""Split or dense: how a prefill runs YOPO's in-layer strategies.

*Split* (the saving): visual and text rows are gathered apart and the visual rows compute only what YOPO keeps (active
heads, the window's keys, the first FFN neurons). That costs extra kernels and host work per layer, which only pays
when there are enough visual rows: on an H200 (2026-12-04, LLaVA-1.5-7B shape, bf16, batch 1, 576 visual tokens)
every split strategy ran slower than no YOPO (0.34x-0.67x). *Dense*: every row runs the module's full products and the
pruned parts are masked out (pruned heads' visual outputs and unused neurons zeroed, the window as an attention
mask): the same function, nothing saved, about the kernels of the unpatched model. Cost records say which ran.

A call runs split when it holds at least ``dense_below`` visual rows (batch x its widest row's visual tokens). The
engine reads that with the prefill's one host read (:meth:`YOPOPolicy.prefill_checks`), so a dense call builds no row
blocks and reads nothing more.
"""

from __future__ import annotations

import torch

from vtexit.methods.yopo.rows import call_rows

# Visual rows per call below which the default runs dense, per device type. CUDA: from the one GPU measurement above
# (576 visual rows lost in every strategy); benchmarks/bench_yopo.py prints split and dense at 576, 2304 and batch 16
# so that a GPU run can move it. CPU: split always (0.87-1.00 of the FLOPs ratio at 576, docs/results.md).
DENSE_BELOW = {"cuda": 2048}


def dense_below_for(device: torch.device, dense_below: int | None) -> int:
    """The threshold in force on ``device``: the config's, else the device type's default."""
    return DENSE_BELOW.get(device.type, 0) if dense_below is None else dense_below


def split_check_name(limit: int) -> str:
    return f"yopo split at {limit} visual rows"


def split_checks(media: torch.Tensor, dense_below: int | None) -> dict[str, torch.Tensor]:
    """For the prefill's read: whether a prefill with ``media`` (batch, length) holds enough visual rows to run split
    on the device ``media`` is on (none when it always does)."""
    limit = dense_below_for(media.device, dense_below)
    if limit == 0:
        return {}
    batch = media.shape[0]
    return {split_check_name(limit): media.sum(1).amax() >= -(-limit // batch)}  # batch x widest row >= limit


def runs_split(engine, device: torch.device, dense_below: int | None) -> bool:
    """Whether this thread's prefill runs split on ``device`` (decided once per call, in the prefill's read; a layer
    on another kind of device than the prompt, e.g. offloaded, counts the row blocks instead)."""
    limit = dense_below_for(device, dense_below)
    if limit == 0:
        return True
    split = engine.prefill_check(split_check_name(limit))
    if split is None:
        split = engine.call_memo(("yopo split", limit), lambda: call_rows(engine).visual.slots.numel() >= limit)
    return split
