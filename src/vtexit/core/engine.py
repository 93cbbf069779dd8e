"""The schedule engine: applies a method's compaction events inside an unmodified transformers model.

Methods decide *which* positions each row keeps and *when* (a :class:`Policy`); the engine does the mechanics with
forward pre-hooks, so no model forward is copied:

* a hook on the multimodal core decides the mode of each call: ``prefill`` (media tokens, empty cache),
  ``decode`` (the cache this engine filled during prefill), or off;
* a hook on every decoder layer gathers ``hidden_states`` at an event and rewrites the sequence-aligned kwargs
  the text model computed once for all layers (rotary cos/sin, position ids, attention mask). Kept tokens keep
  their original positions.

All state lives on the engine instance, so differently patched models work side by side.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL

from vtexit.core.families import FamilySpec, ResolvedFamily, family_for
from vtexit.core.layout import Layout, gather_sequence
from vtexit.core.masks import layer_types, rebuild_mask


@dataclass
class PrefillView:
    """What a policy may look at when deciding an event before ``layer_idx``."""

    layer_idx: int
    layout: Layout
    media_original: torch.Tensor  # (batch, prompt length) bool, True at media (visual) tokens
    hidden_states: torch.Tensor  # (batch, layout.length, hidden), the input of layer_idx

    @property
    def media(self) -> torch.Tensor:
        """Media flags of the current slots."""
        return self.media_original.gather(1, self.layout.index) & self.layout.valid


class Policy(Protocol):
    """A method's decision logic: which slots to keep before a layer, or None for no event there."""

    def keep(self, view: PrefillView) -> torch.Tensor | None: ...


@dataclass
class _PrefillRecord:
    """What decode steps need from the prefill that filled a cache."""

    cache: weakref.ref
    prompt_length: int
    stage_of_layer: list[int]  # per layer: index into `valid` (-1 = full sequence)
    valid: list[torch.Tensor] = field(default_factory=list)  # per stage: (batch, kept length) validity


@dataclass
class _CallState:
    mode: str  # "prefill" | "decode"
    padding: torch.Tensor | None  # the caller's 2D attention mask
    past_length: int = 0
    query_length: int = 0
    media: torch.Tensor | None = None
    layout: Layout | None = None
    stage: int = -1
    stage_valid: list[torch.Tensor] = field(default_factory=list)
    stage_of_layer: list[int] = field(default_factory=list)
    cache: Cache | None = None
    memo: dict = field(default_factory=dict)


class ScheduleEngine:
    """Attaches a :class:`Policy` to a model. Use :meth:`attach`/:meth:`detach` (or a method's handle)."""

    def __init__(self, model: nn.Module, policy: Policy, family: FamilySpec | None = None):
        self.model = model
        self.policy = policy
        self.family = family or family_for(model)
        self.parts: ResolvedFamily = self.family.resolve(model)
        self.text_config = model.config.get_text_config()
        self.layer_types = layer_types(self.text_config)
        if not self.family.media_token_ids(model.config):
            raise ValueError(
                f"model config has none of the media token id attributes {list(self.family.media_token_attrs)}; "
                "vtexit needs them to find the visual tokens"
            )
        self.last_layout: Layout | None = None
        # (num_layers, batch): prompt tokens each layer processed in the last prefill (for FLOPs accounting).
        self.last_tokens_per_layer: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._call: _CallState | None = None
        self._record: _PrefillRecord | None = None

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    # ----------------------------------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if getattr(self.model, "_vtexit_engine", None) is not None:
            raise ValueError(
                "model is already patched by vtexit; call .remove() on the first handle before patching again"
            )
        self._handles.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        self._handles.append(self.parts.core.register_forward_pre_hook(self._core_pre_hook, with_kwargs=True))
        self._handles.append(self.parts.core.register_forward_hook(self._core_post_hook, always_call=True))
        for i, layer in enumerate(self.parts.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self.model._vtexit_engine = self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None
        self._record = None
        if getattr(self.model, "_vtexit_engine", None) is self:
            del self.model._vtexit_engine

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ----------------------------------------------------------------------------------------- hooks
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise ValueError(
                "labels cannot be used while vtexit withdraws tokens: the logits then cover only the kept positions "
                "and no longer line up with input_ids. Compute the loss on the unpatched model (handle.remove())."
            )

    def _core_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._call = None
        cache = kwargs.get("past_key_values")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        has_media_inputs = any(kwargs.get(name) is not None for name in MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL)
        padding = kwargs.get("attention_mask")
        if isinstance(padding, dict) or (isinstance(padding, torch.Tensor) and padding.ndim != 2):
            raise ValueError(
                "vtexit needs a 2D attention_mask (got a prepared 4D mask or mask mapping). StaticCache and "
                "compiled generation pre-build masks and are not supported: use the default DynamicCache."
            )
        if isinstance(cache, Cache) and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"past_key_values is a {type(cache).__name__}; vtexit caches fewer positions in withdrawn layers and "
                "supports only DynamicCache (the default of generate)"
            )
        past_length = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if past_length > 0:
            record = self._record
            ours = record is not None and record.cache() is cache
            if has_media_inputs:
                raise ValueError(
                    "media inputs were passed with a non-empty cache (multi-turn with new images); vtexit supports "
                    "media only in the first call on an empty cache"
                )
            if ours:
                query_length = _sequence_length(input_ids, kwargs.get("inputs_embeds"))
                self._call = _CallState(
                    mode="decode", padding=padding, past_length=past_length, query_length=query_length
                )
            return
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "vtexit finds visual tokens from input_ids, but this call passed only inputs_embeds; "
                    "pass input_ids (with pixel inputs) instead"
                )
            return
        media = self.family.media_mask(self.model.config, input_ids)
        if not bool(media.any()):
            return
        batch, length = input_ids.shape
        self._call = _CallState(
            mode="prefill",
            padding=padding,
            media=media,
            layout=Layout.full(padding, batch, length, input_ids.device),
        )

    def _core_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or call.mode != "prefill":
            return
        self.last_layout = call.layout
        prompt = call.media.shape[1] if call.padding is None else call.padding.sum(1)
        prompt = torch.as_tensor(prompt).expand(call.media.shape[0])
        self.last_tokens_per_layer = torch.stack(
            [prompt if s < 0 else call.stage_valid[s].sum(1) for s in call.stage_of_layer]
        ).cpu()
        if call.cache is not None:
            self._record = _PrefillRecord(
                cache=weakref.ref(call.cache),
                prompt_length=call.media.shape[1],
                stage_of_layer=call.stage_of_layer,
                valid=call.stage_valid,
            )

    def _layer_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call
            if call is None:
                return None
            if call.mode == "prefill":
                return self._prefill_layer(layer_idx, call, args, kwargs)
            return self._decode_layer(layer_idx, call, args, kwargs)

        return hook

    # ----------------------------------------------------------------------------------------- prefill
    def _prefill_layer(self, layer_idx: int, call: _CallState, args: tuple, kwargs: dict):
        hidden, rest, in_kwargs = _split_hidden(args, kwargs)
        if layer_idx == 0:
            cache = kwargs.get("past_key_values")
            call.cache = cache if isinstance(cache, Cache) else None
        keep = self.policy.keep(PrefillView(layer_idx, call.layout, call.media, hidden))
        if keep is not None:
            call.layout, source = call.layout.select(keep)
            hidden = _compact_hidden(hidden, source, call.layout)
            call.stage += 1
            call.stage_valid.append(call.layout.valid)
        call.stage_of_layer.append(call.stage)
        if call.stage < 0:
            return None if keep is None else _join_hidden(hidden, rest, kwargs, in_kwargs)
        kwargs = self._compacted_kwargs(layer_idx, call, hidden, kwargs)
        return _join_hidden(hidden, rest, kwargs, in_kwargs)

    def _compacted_kwargs(self, layer_idx: int, call: _CallState, hidden: torch.Tensor, kwargs: dict) -> dict:
        """Rewrite the full-sequence kwargs of a decoder layer for the current layout."""
        kwargs = dict(kwargs)
        index = call.layout.index
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = self._memo(
                call, kwargs["position_embeddings"], lambda pe: tuple(gather_sequence(t, index, -2) for t in pe)
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self._memo(call, kwargs["position_ids"], lambda p: gather_sequence(p, index, -1))
        kwargs["attention_mask"] = self._mask(layer_idx, call, hidden, call.layout.valid, call.cache)
        return kwargs

    def replay(
        self,
        layer_inputs: list[tuple[torch.Tensor, dict]],
        start: int,
        keep: torch.Tensor,
        padding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Layout]:
        """Run layers ``start..N-1`` on the kept positions only, from recorded full-sequence layer inputs.

        ``layer_inputs[i]`` is what layer i received (hidden states, kwargs) in an unpatched ``use_cache=False``
        forward. This is how calibration gets the KL for every K from one full forward.
        """
        hidden, kwargs0 = layer_inputs[start]
        batch, length = hidden.shape[:2]
        call = _CallState(mode="prefill", padding=padding)
        call.layout, source = Layout.full(padding, batch, length, hidden.device).select(keep)
        call.stage = 0
        hidden = _compact_hidden(hidden, source, call.layout)
        for j in range(start, self.num_layers):
            kwargs = self._compacted_kwargs(j, call, hidden, layer_inputs[j][1])
            kwargs["past_key_values"] = None
            kwargs["use_cache"] = False
            hidden = self.parts.layers[j](hidden, **kwargs)
        return hidden, call.layout

    # ----------------------------------------------------------------------------------------- decode
    def _decode_layer(self, layer_idx: int, call: _CallState, args: tuple, kwargs: dict):
        record = self._record
        stage = record.stage_of_layer[layer_idx]
        if stage < 0:
            return None
        call.stage = stage
        hidden = args[0] if args else kwargs["hidden_states"]

        def key_padding() -> torch.Tensor:
            # Keys of this layer: the prompt positions it kept at prefill, then every token decoded since.
            prompt_valid = record.valid[stage]
            if call.padding is not None:
                tail = call.padding[:, record.prompt_length :].to(device=prompt_valid.device, dtype=torch.bool)
            else:
                new_columns = call.past_length + call.query_length - record.prompt_length
                tail = torch.ones(prompt_valid.shape[0], new_columns, dtype=torch.bool, device=prompt_valid.device)
            return torch.cat([prompt_valid, tail], dim=1)

        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._mask(layer_idx, call, hidden, key_padding, kwargs.get("past_key_values"))
        return args, kwargs

    # ----------------------------------------------------------------------------------------- helpers
    def _mask(self, layer_idx: int, call: _CallState, hidden: torch.Tensor, key_padding, cache) -> Any:
        """The rebuilt mask of this stage and layer type, built once per forward; ``key_padding`` is lazy."""
        layer_type = self.layer_types[layer_idx]
        key = ("mask", call.stage, layer_type)
        if key not in call.memo:
            padding = key_padding() if callable(key_padding) else key_padding
            call.memo[key] = rebuild_mask(self.text_config, layer_type, hidden, padding, cache, layer_idx)
        return call.memo[key]

    @staticmethod
    def _memo(call: _CallState, obj: Any, convert) -> Any:
        # Conversions are memoised by identity, once per stage: the text model passes the same objects to every
        # layer (or one per layer type), so each is gathered once per forward.
        key = (id(obj), call.stage)
        hit = call.memo.get(key)
        if hit is None or hit[0] is not obj:
            hit = (obj, convert(obj))
            call.memo[key] = hit
        return hit[1]


def _compact_hidden(hidden: torch.Tensor, source: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Gather the kept slots of ``hidden``; pad slots are zeroed so they stay finite through the layers."""
    return gather_sequence(hidden, source, seq_dim=1) * layout.valid.unsqueeze(-1).to(hidden.dtype)


def _sequence_length(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    tensor = input_ids if input_ids is not None else inputs_embeds
    return int(tensor.shape[1])


def _split_hidden(args: tuple, kwargs: dict):
    if args:
        return args[0], args[1:], False
    return kwargs["hidden_states"], (), True


def _join_hidden(hidden, rest, kwargs, in_kwargs):
    if in_kwargs:
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return rest, kwargs
    return (hidden, *rest), kwargs
