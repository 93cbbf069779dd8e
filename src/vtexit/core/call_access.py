"""What a method's own code may ask of the running call: the media flags and layout of the slots a layer computes, the
visual grid, the policy's prefill checks, a per-call memo, and where to record what it skipped.

Replacement forwards (in-layer methods such as YOPO) get this view of the engine, not the engine: it holds the patched
model's parts and the running call of this thread, and nothing that decides a call's course.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from vtexit.core.call_state import CallState
from vtexit.core.families import FamilySpec, ResolvedFamily
from vtexit.core.layout import Layout


class CallAccess:
    """The patched model's parts and the call running in this thread, as methods see them."""

    def __init__(self, model: nn.Module, family: FamilySpec):
        self.model = model
        self.family = family
        self.parts: ResolvedFamily = family.resolve(model)
        self._local = threading.local()

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def _call(self) -> CallState | None:
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, value: CallState | None) -> None:
        self._local.call = value

    def current_media(self) -> torch.Tensor | None:
        """Media flags (batch, length) of the slots the running layer holds in this thread's prefill; None during
        decode (every new token is text) or outside a patched call. For replacement forwards (made once per layout:
        every layer between two events gets the same tensor, so do not modify it in place)."""
        call = self._call
        if call is None or call.mode != "prefill":
            return None
        layout, media = call.memo.get("current media", (None, None))
        if layout is not call.layout:
            layout, media = call.layout, call.media.gather(1, call.layout.index) & call.layout.valid
            call.memo["current media"] = (layout, media)
        return media

    def current_block_ids(self) -> torch.Tensor | None:
        """(batch, length) the bidirectional media block of each slot the running layer holds in this thread's prefill
        (-1: text or pad), for families whose media blocks attend both ways (Gemma3's images); None when the call
        passed none (its mask is then causal) or outside a prefill. Made once per layout, like ``current_media``."""
        call = self._call
        if call is None or call.mode != "prefill" or call.block_ids is None:
            return None
        layout, blocks = call.memo.get("current block ids", (None, None))
        if layout is not call.layout:
            layout = call.layout
            blocks = torch.where(layout.valid, call.block_ids.gather(1, layout.index), -1)
            call.memo["current block ids"] = (layout, blocks)
        return blocks

    def prefill_check(self, name: str) -> bool | None:
        """The value of the policy's prefill check ``name`` (:meth:`Policy.prefill_checks`) in this thread's prefill,
        read with the prefill's one host read; None when the policy did not ask it in this call."""
        call = self._call
        if call is None or call.mode != "prefill":
            raise ValueError(f"prefill check {name!r} asked outside a prefill of this patch")
        return call.checks.get(name)

    def current_layout(self) -> Layout | None:
        """The slots the running layer holds in this thread's prefill (None outside a prefill)."""
        call = self._call
        return call.layout if call is not None and call.mode == "prefill" else None

    def call_mode(self) -> str | None:
        """"prefill" (media on an empty cache), "decode" (continuing a cache this engine filled) or None (a call the
        patch does not touch) for the call running in this thread."""
        call = self._call
        return None if call is None else call.mode

    def call_memo(self, key: Any, build) -> Any:
        """``build()`` once per call of this thread (e.g. index tensors every layer of an in-layer method reuses)."""
        memo = self._call.memo
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def key_media(self, layer_idx: int, num_keys: int) -> torch.Tensor:
        """(batch, num_keys) bool: which keys of layer ``layer_idx`` are media tokens, in the order of the layer's
        cache (the prompt slots the layer holds, then every token since). For in-layer methods in prefill and decode."""
        call = self._call
        if call.mode == "prefill":
            media = self.current_media()
        else:
            stage = call.record.stage_of_layer[layer_idx]
            media = call.record.media
            if stage >= 0:
                layout = call.record.stages[stage].layout
                media = media.gather(1, layout.index) & layout.valid
        if media.shape[1] < num_keys:
            media = torch.nn.functional.pad(media, (0, num_keys - media.shape[1]), value=False)
        return media[:, :num_keys]

    def media_grid(self):
        """Where each prompt position of this thread's prefill sits on its image's patch grid (see
        :class:`vtexit.core.grids.VisualGrid`), from the family's description; memoised per call."""
        call = self._call
        if self.family.visual_grid is None:
            raise ValueError(f"family {self.family.name!r} does not describe its visual patch grid")
        return self.call_memo(
            "media grid",
            lambda: self.family.visual_grid(self.model.config, call.media, call.grid_inputs),
        )

    def record_fraction(
        self,
        layer_idx: int,
        *,
        heads: float | None = None,
        ffn: float | None = None,
        visual_keys: torch.Tensor | None = None,
    ) -> None:
        """Record what the visual query rows of a layer used, for cost records (called by in-layer methods): the
        share of heads and of FFN neurons, and ``visual_keys`` (batch,), the keys all visual query rows of a row
        attended to in total when a method limited them (else every key)."""
        call = self._call
        if call is None:
            return
        old = call.fractions.get(layer_idx, (None, None, None))
        new = (heads, ffn, visual_keys)
        call.fractions[layer_idx] = tuple(o if n is None else n for o, n in zip(old, new, strict=True))
