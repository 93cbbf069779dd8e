"""Withdrawal on transformers' ``StaticCache``, eager or under its compiled decode.

Design: each layer's static buffers hold what that layer keeps. Layers that keep the whole prompt keep their
``max_cache_len`` slots; a layer that runs the prefill on a compacted layout of ``L'`` slots (of ``L``) is sized,
before its first write, to ``max_cache_len - (L - L')``: its kept prompt slots, then room for every decoded token.
transformers allocates static buffers at a layer's first write and lets layers of one cache differ in length, so
withdrawn slots are never allocated, decode reads and attends over fewer keys, and memory falls as on the dynamic
cache. ``cache.reset()`` gives every layer its full length back (and frees the small buffers), so a reset cache is
valid for any model again.

A decode step gets one prepared mask for the full layers (generate builds it from layer 0's cache). The mask of a
compacted layer is derived from it with fixed tensors made once after the prefill (a :class:`StaticPlan` kept on
the cache): prompt slots take the stage's validity, later slots read the full mask's column ``L - L'`` further
on. No per-step host work and no Python state, so the step traces into transformers' compiled decode. When the
prompt was reduced before the language model, layer 0 is compacted too and generate's mask (built from layer 0's
buffers) no longer lines up with the prompt's positions; each layer's mask is then built from the plan and the
layer's own written length (a device tensor).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from vtexit.core.call_state import PrefillRecord
from vtexit.core.guards import forget_on_reset
from vtexit.core.transformers_compat import Cache, StaticLayer, size_static_layer, static_layer_length

PLAN_ATTRIBUTE = "_vtexit_static_plan"
FULL_LENGTHS_ATTRIBUTE = "_vtexit_full_lengths"  # each layer's max_cache_len before vtexit sized it
SET_ASIDE_ATTRIBUTE = "_vtexit_set_aside"  # layer -> (keys, values): small buffers a reset took off the layer


@dataclass
class StaticStage:
    """How a compacted layer's decode mask is read from the full layers' mask (all on the cache's device)."""

    slots: torch.Tensor  # (slots,) long: 0.. the stage's buffer length
    source: torch.Tensor  # (slots,) long: the full mask's column each slot of the stage's buffers reads
    from_full: torch.Tensor  # (slots,) bool: slots that read the full mask (decoded tokens)
    prompt_keys: torch.Tensor  # (batch, 1, 1, slots) bool: kept prompt slots (False elsewhere)
    position_shift: torch.Tensor | None  # (batch, 1) positions removed by renumbering


@dataclass
class StaticPlan:
    """What decode steps on a static cache need from the prefill that filled it."""

    owner: Any  # the engine that made it
    stage_of_layer: tuple[int, ...]
    stages: list[StaticStage]
    record: PrefillRecord | None  # None: a call the patch left alone (no media)
    max_cache_len: int

    @functools.cached_property  # read by every eager decode step's cost record
    def layer_lengths(self) -> tuple[int, ...]:
        """Slots of each layer's static buffers (what a decode step attends over, masked)."""
        return tuple(self.max_cache_len if s < 0 else len(self.stages[s].source) for s in self.stage_of_layer)

    @property
    def reduces_prompt(self) -> bool:
        """Layer 0 holds fewer slots than the prompt (a reduction before the language model): no layer is full."""
        return self.record is not None and self.record.reduces_prompt

    def layer_mask(self, layer_idx: int, mask: torch.Tensor | None, cache: Cache, queries: int) -> torch.Tensor:
        """The decode mask of compacted layer ``layer_idx`` for ``queries`` new tokens, from generate's prepared
        ``mask`` (or, when the prompt was reduced, from what the layer's buffers in ``cache`` hold)."""
        stage = self.stages[self.stage_of_layer[layer_idx]]
        if self.reduces_prompt:
            return reduced_stage_mask(stage, mask, static_layer_length(cache.layers[layer_idx]), queries)
        return stage_mask(stage, mask)


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


def full_max_length(cache: Cache) -> int:
    """The cache's ``max_cache_len`` as it was made (``get_max_length()`` reads layer 0, which a reduction before
    the language model sizes down too)."""
    full = cache.__dict__.get(FULL_LENGTHS_ATTRIBUTE)
    return cache.get_max_length() if full is None else full[0]


def size_compacted_layer(cache: Cache, layer_idx: int, kept_slots: int, prompt_length: int) -> None:
    """Before a compacted layer's first write in a prefill: its buffers hold its ``kept_slots`` prompt slots and
    room for every token after the prompt. Buffers of that size that a reset set aside are taken back, so a cache
    reset and passed again keeps the same tensors (no new CUDA graph). Python ints only (no host sync)."""
    full = cache.__dict__.get(FULL_LENGTHS_ATTRIBUTE)
    if full is None:
        full = tuple(layer.max_cache_len for layer in cache.layers)
        setattr(cache, FULL_LENGTHS_ATTRIBUTE, full)
        setattr(cache, SET_ASIDE_ATTRIBUTE, {})
        forget_on_reset(cache, restore=restore_full_lengths)
    layer, length = cache.layers[layer_idx], full[layer_idx] - (prompt_length - kept_slots)
    set_aside = cache.__dict__[SET_ASIDE_ATTRIBUTE].pop(layer_idx, None)
    size_static_layer(layer, length)
    if set_aside is not None and not layer.is_initialized and set_aside[0].shape[2] == length:
        layer.keys, layer.values = set_aside
        layer.is_initialized = True


def restore_full_lengths(cache: Cache) -> None:
    """On reset: every layer back to the length it was made with, its smaller buffers set aside for the next
    prefill of a patch (they are allocated again at full length if another model uses the cache)."""
    set_aside = cache.__dict__.get(SET_ASIDE_ATTRIBUTE, {})
    full = cache.__dict__.get(FULL_LENGTHS_ATTRIBUTE, ())
    for i, (layer, length) in enumerate(zip(cache.layers, full, strict=False)):
        if layer.max_cache_len != length and layer.is_initialized:
            set_aside[i] = (layer.keys.zero_(), layer.values.zero_())
        elif layer.is_initialized:
            set_aside.pop(i, None)  # the layer has run at full length since: its small buffers are not needed
        size_static_layer(layer, length)
    forget_on_reset(cache, restore=restore_full_lengths)  # for the next reset


def build_plan(owner: Any, record: PrefillRecord | None, max_cache_len: int, num_layers: int) -> StaticPlan:
    """The fixed decode tensors of every stage of ``record`` (tensor ops only: no host sync)."""
    if record is None:
        return StaticPlan(owner, (-1,) * num_layers, [], None, max_cache_len)
    stages = []
    for stage in record.stages:
        valid = stage.layout.valid
        kept = valid.shape[1]
        withdrawn = record.prompt_length - kept
        slots = torch.arange(max_cache_len - withdrawn, device=valid.device)  # the stage's buffers (see above)
        prompt_keys = F.pad(valid, (0, len(slots) - kept), value=False)
        stages.append(
            StaticStage(
                slots=slots,
                source=slots + withdrawn,
                from_full=slots >= kept,
                prompt_keys=prompt_keys[:, None, None, :],
                position_shift=stage.position_shift,
            )
        )
    return StaticPlan(owner, tuple(record.stage_of_layer), stages, record, max_cache_len)


def stage_mask(stage: StaticStage, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask of a compacted layer from the full layers' prepared 4D mask (bool, or additive float)."""
    _check_prepared(mask)
    shifted = mask.index_select(-1, stage.source)
    return torch.where(stage.from_full, shifted, _in_mask_dtype(stage.prompt_keys, mask.dtype))


def reduced_stage_mask(
    stage: StaticStage, mask: torch.Tensor | None, written: torch.Tensor, queries: int
) -> torch.Tensor:
    """The decode mask of a layer when layer 0 is compacted too. generate builds its mask from layer 0's buffers,
    whose slots no longer line up with the prompt's positions, so only its dtype is used: kept prompt slots, then
    the decoded slots up to each query's own (the ``written`` slots before this step, then one per query)."""
    _check_prepared(mask)
    last = written + torch.arange(queries, device=stage.slots.device).unsqueeze(1)  # (queries, 1): each query's slot
    decoded = stage.from_full & (stage.slots <= last)  # (queries, slots)
    return _in_mask_dtype(stage.prompt_keys | decoded, mask.dtype)


def _check_prepared(mask: torch.Tensor | None) -> None:
    if mask is None or mask.ndim != 4:
        raise ValueError(
            "decoding on a static cache under vtexit needs the prepared 4D attention mask that generate builds for "
            "static caches (got none); call generate(..., cache_implementation='static') or pass a 2D attention_mask"
        )


def _in_mask_dtype(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (bool) as a mask of ``dtype``: itself, or additive (0 where allowed, the dtype's min elsewhere)."""
    return allowed if dtype == torch.bool else (~allowed).to(dtype) * torch.finfo(dtype).min


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
