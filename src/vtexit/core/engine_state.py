"""What the schedule engine knows of the model it patches and keeps between calls: the family's parts, the policy,
the layers that get hooks, the records of the caches it filled, and the small memoised tensors every call reuses.

The modules that carry out each kind of call (``vtexit.core.calls``) read and write this state; the engine
(``vtexit.core.engine``) owns it and wires the hooks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from vtexit.core.attention_scores import check_supported
from vtexit.core.call_access import CallAccess
from vtexit.core.call_state import CallState, PrefillRecord
from vtexit.core.costs import RunCost
from vtexit.core.families import FamilySpec, family_for
from vtexit.core.layout import Layout
from vtexit.core.masks import layer_types, rebuild_mask
from vtexit.core.policy import Policy
from vtexit.core.transformers_compat import Cache, mrope_offset, uses_multimodal_rope


class EngineState(CallAccess):
    """The patched model, its policy, and the state the engine keeps across calls (per thread where per call)."""

    def __init__(self, model: nn.Module, policy: Policy | None, family: FamilySpec | None = None):
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a vtexit.Policy (subclass it), got {type(policy).__name__}")
        super().__init__(model, family or family_for(model))
        self.policy = policy if policy is not None else Policy()
        self.text_config = model.config.get_text_config()
        # Whether the language model numbers positions in 3D (Qwen-VL's M-RoPE: time, height, width).
        self.multimodal_rope = uses_multimodal_rope(self.text_config)
        self.layer_types = layer_types(self.text_config)
        self.min_layer = max(1, self.family.min_layer(model.config))
        self._media_token_ids = list(self.family.media_token_ids(model.config))
        if not self._media_token_ids:
            raise ValueError(
                f"model config has none of the media token id attributes {list(self.family.media_token_attrs)}; "
                "vtexit needs them to find the visual tokens"
            )
        self.event_layers = None if self.policy.event_layers is None else frozenset(self.policy.event_layers)
        self._media_ids: dict[torch.device, torch.Tensor] = {}
        self._full_index: tuple[tuple, torch.Tensor] | None = None  # the last prefill's positions, reused
        self.handle = None  # set by the PatchHandle that owns this engine
        self.hooks: list[Any] = []
        self.replaced: list[nn.Module] = []  # modules whose forward the policy replaced
        self.init_runtime_state()

    def init_runtime_state(self) -> None:
        """Fresh per-thread slots, lock and cache records (at creation and in a deep copy)."""
        self._local = threading.local()
        self.lock = threading.Lock()
        self.records: weakref.WeakKeyDictionary[Cache, PrefillRecord] = weakref.WeakKeyDictionary()
        self.labels_under_compile = False

    # ----------------------------------------------------------------------------------------- per-thread state
    @property
    def current_call(self) -> CallState | None:
        """The call running in this thread (None: none, or one the patch leaves alone)."""
        return self._call

    @current_call.setter
    def current_call(self, value: CallState | None) -> None:
        self._call = value

    @property
    def thread_state(self) -> threading.local:
        """What this thread's calls leave behind (last layout, cost, policy state, labels held by the top hooks)."""
        return self._local

    @property
    def last_layout(self) -> Layout | None:
        """Slots of the last call in this thread: logits line up with them. None after a call nothing changed."""
        return getattr(self._local, "last_layout", None)

    @property
    def last_policy_state(self) -> dict:
        """What the policy kept in ``view.state`` during the last prefill in this thread."""
        return getattr(self._local, "last_policy_state", {})

    @property
    def last_cost(self) -> RunCost | None:
        """Cost record of the last prefill in this thread and of the decode steps that continued it."""
        return getattr(self._local, "last_cost", None)

    # ----------------------------------------------------------------------------------------- the schedule's shape
    @property
    def first_hooked_layer(self) -> int:
        """Layers before the policy's first possible event run untouched, so they get no hook at all."""
        if self.event_layers is None:
            return min(self.min_layer, self.num_layers)
        return min([*self.event_layers, self.num_layers])

    @property
    def planned_withdrawal(self) -> int | None:
        """The layer before which every media slot leaves, when the policy's schedule is planned from the prompt."""
        layer = self.policy.withdraw_media_at
        return None if self.replaced or layer is None or layer >= self.num_layers else layer

    def attention_module(self, layer_idx: int) -> nn.Module:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"attention layer must be in [0, {self.num_layers - 1}], got {layer_idx}")
        attention = getattr(self.parts.layers[layer_idx], self.family.attention, None)
        if attention is None:
            raise ValueError(f"decoder layer {layer_idx} has no attribute {self.family.attention!r}")
        check_supported(attention)
        return attention

    @property
    def grid_offset(self) -> Callable[[], torch.Tensor | None] | None:
        """On multimodal RoPE: reads the core's stored offset of text positions after the image grids (see
        :func:`vtexit.core.transformers_compat.mrope_offset`); None on 1D positions."""
        return partial(mrope_offset, self.parts.core) if self.multimodal_rope else None

    def renumbers_at(self, layer_idx: int) -> bool:
        """Whether the event before ``layer_idx`` renumbers positions. A reduction before the language model
        (layer 0) gives the kept tokens the positions of the shorter prompt where positions are 1D; on multimodal
        RoPE every kept token keeps its original (t, h, w) position, as the text after it does."""
        if layer_idx == 0 and self.multimodal_rope:
            return False
        return self.policy.renumbers_at(layer_idx)

    def check_policy(self) -> None:
        """Refuse, before anything is attached, a policy this model cannot run (ValueError saying why)."""
        early = sorted(i for i in self.event_layers or () if i < self.min_layer and not self._reduces_prompt(i))
        if early:
            raise ValueError(
                f"the policy's event_layers include {early}; this model needs layers 0..{self.min_layer - 1} to keep "
                "the full sequence (transformers sizes masks and positions from them)"
            )
        later = self.event_layers if self.event_layers is not None else range(self.min_layer, self.num_layers)
        if not any(self.policy.renumbers_at(i) for i in later if i > 0 or not self._reduces_prompt(i)):
            return
        rotary = getattr(self.parts.language_model, "rotary_emb", None)
        if self.multimodal_rope or rotary is None:
            raise ValueError(
                f"renumber_positions is not supported for {self.family.name}: it needs 1D rotary positions "
                "(multimodal RoPE positions have no renumbering)"
            )

    def _reduces_prompt(self, layer_idx: int) -> bool:
        """An event before layer 0 that renumbers positions shortens the prompt the language model sees (a pre-LLM
        reduction), on every family: every layer then holds the shorter prompt, so the engine rebuilds every mask
        (the first layer of each attention type included) and feeds deepstack features to the kept tokens only."""
        return layer_idx == 0 and self.policy.renumbers_at(0) and self.rotary_renumbers()

    def rotary_renumbers(self) -> bool:
        """The language model has a rotary embedding the engine can recompute for renumbered positions (with the
        layer type where it takes one, as Gemma3's does), or numbers positions in 3D (kept, not renumbered)."""
        return self.multimodal_rope or getattr(self.parts.language_model, "rotary_emb", None) is not None

    # ----------------------------------------------------------------------------------------- reused tensors
    def media_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, length) bool: True at the prompt's media tokens."""
        if len(self._media_token_ids) == 1:
            return input_ids == self._media_token_ids[0]
        ids = self._media_ids.get(input_ids.device)
        if ids is None:
            ids = torch.tensor(self._media_token_ids, device=input_ids.device)
            self._media_ids[input_ids.device] = ids
        return torch.isin(input_ids, ids)

    def positions(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(batch, length) original positions of a prefill, kept for the next prefill of the same shape (read only,
        like every layout index)."""
        key = (batch, length, device)
        cached = self._full_index
        if cached is None or cached[0] != key:
            cached = (key, torch.arange(length, device=device).expand(batch, length))
            self._full_index = cached
        return cached[1]

    def follow_model(self, hidden: torch.Tensor) -> None:
        """Method-owned modules follow the model's device and dtype (moved only when they differ)."""
        for module in self.policy.modules().values():
            parameter = next(module.parameters(), None)
            if parameter is not None and (parameter.device != hidden.device or parameter.dtype != hidden.dtype):
                module.to(device=hidden.device, dtype=hidden.dtype)

    def layer_mask(
        self,
        layer_idx: int,
        call: CallState,
        hidden: torch.Tensor,
        key_padding: torch.Tensor,
        cache,
        block_ids: torch.Tensor | None = None,
    ) -> Any:
        """The rebuilt mask of this stage and layer type, built once per forward."""
        layer_type = self.layer_types[layer_idx]
        key = ("mask", call.stage, layer_type)
        if key not in call.memo:
            call.memo[key] = rebuild_mask(
                self.text_config, layer_type, hidden, key_padding, cache, layer_idx, block_ids
            )
        return call.memo[key]
