"""Withdrawal on transformers' ``StaticCache``, eager or under its compiled decode.

Design: every layer keeps its full-length static buffers (``max_cache_len`` slots, as without vtexit). A layer that
ran a prefill on a compacted layout writes its kept slots at the front (transformers' static layers count their own
length), so its buffer holds ``L'`` prompt slots, then every decoded token, then unused slots. Memory is that of
the unpatched static cache: the withdrawn slots are never written, and decode attends over the buffer with a mask,
as the unpatched static decode does. The saving is in the prefill.

A decode step gets one prepared mask for the full layers (generate builds it from layer 0's cache). The mask of a
compacted layer is derived from it with fixed tensors made once after the prefill (a :class:`StaticPlan` kept on
the cache): prompt slots take the stage's validity, later slots read the full mask's column ``L - L'`` further
on. No per-step host work and no Python state, so the step traces into transformers' compiled decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from vtexit.core.call_state import PrefillRecord
from vtexit.core.guards import forget_on_reset
from vtexit.core.transformers_compat import Cache, StaticLayer

PLAN_ATTRIBUTE = "_vtexit_static_plan"


@dataclass
class StaticStage:
    """How a compacted layer's decode mask is read from the full layers' mask (all on the cache's device)."""

    source: torch.Tensor  # (max_cache_len,) long: the full mask's column each slot reads
    from_full: torch.Tensor  # (max_cache_len,) bool: slots that read the full mask (decoded tokens)
    prompt_keys: torch.Tensor  # (batch, 1, 1, max_cache_len) bool: kept prompt slots (False elsewhere)
    position_shift: torch.Tensor | None  # (batch, 1) positions removed by renumbering


@dataclass
class StaticPlan:
    """What decode steps on a static cache need from the prefill that filled it."""

    owner: Any  # the engine that made it
    stage_of_layer: tuple[int, ...]
    stages: list[StaticStage]
    record: PrefillRecord | None  # None: a call the patch left alone (no media)
    max_cache_len: int

    def layer_mask(self, layer_idx: int, mask: torch.Tensor) -> torch.Tensor:
        return stage_mask(self.stages[self.stage_of_layer[layer_idx]], mask)


def is_static(cache) -> bool:
    """A cache with fixed-size buffers (``is_compileable``), which vtexit runs through this module."""
    return isinstance(cache, Cache) and bool(getattr(cache, "is_compileable", False))


def check_static_cache(cache: Cache) -> None:
    """Refuse static caches whose layers vtexit does not describe (sliding windows, offloading, subclasses)."""
    kinds = {type(layer) for layer in getattr(cache, "layers", [])}
    if not kinds or kinds != {StaticLayer}:
        names = sorted(kind.__name__ for kind in kinds) or ["none"]
        raise ValueError(
            f"the cache is a {type(cache).__name__} with layers {names}; vtexit supports static caches made "
            "only of StaticLayer (no sliding-window or offloaded layers). Use the default DynamicCache for this model."
        )
    if getattr(cache, "offloading", False):
        raise ValueError("the cache is an offloaded static cache; vtexit supports StaticCache without offloading")


def plan_of(cache) -> StaticPlan | None:
    return getattr(cache, PLAN_ATTRIBUTE, None)


def attach_plan(cache: Cache, plan: StaticPlan) -> None:
    """Keep ``plan`` on ``cache`` until the cache is reset (``cache.reset()`` drops it)."""
    setattr(cache, PLAN_ATTRIBUTE, plan)
    forget_on_reset(cache, PLAN_ATTRIBUTE)


def drop_plan(cache: Cache) -> None:
    cache.__dict__.pop(PLAN_ATTRIBUTE, None)
    cache.__dict__.pop("reset", None)


def build_plan(owner: Any, record: PrefillRecord | None, max_cache_len: int, num_layers: int) -> StaticPlan:
    """The fixed decode tensors of every stage of ``record`` (tensor ops only: no host sync)."""
    if record is None:
        return StaticPlan(owner, (-1,) * num_layers, [], None, max_cache_len)
    stages = []
    for stage in record.stages:
        valid = stage.layout.valid
        kept = valid.shape[1]
        withdrawn = record.prompt_length - kept
        slots = torch.arange(max_cache_len, device=valid.device)
        prompt_keys = F.pad(valid, (0, max_cache_len - kept), value=False)
        stages.append(
            StaticStage(
                source=(slots + withdrawn).clamp(max=max_cache_len - 1),
                from_full=(slots >= kept) & (slots + withdrawn < max_cache_len),
                prompt_keys=prompt_keys[:, None, None, :],
                position_shift=stage.position_shift,
            )
        )
    return StaticPlan(owner, tuple(record.stage_of_layer), stages, record, max_cache_len)


def stage_mask(stage: StaticStage, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask of a compacted layer from the full layers' prepared 4D mask (bool, or additive float)."""
    if mask is None or mask.ndim != 4:
        raise ValueError(
            "decoding on a static cache under vtexit needs the prepared 4D attention mask that generate builds for "
            "static caches (got none); call generate(..., cache_implementation='static') or pass a 2D attention_mask"
        )
    shifted = mask.index_select(-1, stage.source)
    if mask.dtype == torch.bool:
        fixed = stage.prompt_keys
    else:
        fixed = (~stage.prompt_keys).to(mask.dtype) * torch.finfo(mask.dtype).min
    return torch.where(stage.from_full, shifted, fixed)


def padding_from_prepared(mask, length: int) -> torch.Tensor | None:
    """The caller's 2D padding (batch, length) from a mask generate prepared for a static cache: the row of the last
    query sees every real prompt key (padding masks keys only). None when the mask says nothing (no padding)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ValueError(
            f"vtexit reads the padding of a static-cache prefill from its 4D mask; got a {type(mask).__name__} "
            "(flex attention block masks are not supported)"
        )
    row = mask[:, 0, -1, :length]
    return row if row.dtype == torch.bool else row == 0
