"""Qwen3-VL's deepstack features under a reduced prompt: the text model adds visual features from inner tower layers
to the output of its first decoder layers, one row per visual token of the full prompt. When the prompt was
reduced before the language model, each kept visual slot gets its own token's rows, or, where the method merged
tokens into it (pooling), the same merge of their rows; the dropped tokens' rows go unused, as if the model had been
given the reduced prompt and the kept tokens' features."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vtexit.core.call_state import CallState
from vtexit.core.engine_state import EngineState
from vtexit.core.policy import PrefillView
from vtexit.core.transformers_compat import DEEPSTACK_METHOD


def note_deepstack(engine: EngineState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the text model: keep this prefill's deepstack inputs for the event before layer 0."""
    call = engine.current_call
    if call is not None and call.mode == "prefill" and kwargs.get("deepstack_visual_embeds") is not None:
        call.deepstack = (kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])


def merged_deepstack(engine: EngineState, call: CallState, view: PrefillView, keep: torch.Tensor) -> dict:
    """At the event before layer 0: each deepstack feature list entry laid out on the prompt (batch, length, dim)
    and merged as the policy merges hidden states (``keep``: the prompt's kept slots); the engine then gathers the
    kept slots. Keyed by the entry's id (the text model passes the same entries to its deepstack step)."""
    mask, features = call.deepstack
    batch, length = call.media.shape
    merged_rows = {}
    for entry in features:
        full = view.hidden_states.new_zeros(batch, length, entry.shape[-1])
        full = full.masked_scatter(mask.to(full.device).unsqueeze(-1), entry.to(full))
        prompt = full[:, : view.layout.length]
        # A copy of the policy's state for each merge: merge() may consume what keep() left there.
        merged = engine.policy.merge(dataclasses.replace(view, hidden_states=prompt, state=dict(view.state)), keep)
        if merged is not None and merged.shape[1] < length:  # draft tokens of speculative decoding: no features
            merged = torch.cat([merged, full[:, merged.shape[1] :]], dim=1)
        merged_rows[id(entry)] = full if merged is None else merged
    return merged_rows


def deepstack_on_layout(
    engine: EngineState, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """The text model's deepstack step for the slots the running prefill holds (the family's own step when they are
    the full prompt): each slot adds its rows from the event before layer 0. No host read."""
    call = engine.current_call
    if call is None or call.mode != "prefill" or call.stage < 0:
        language_model = engine.parts.language_model
        return getattr(type(language_model), DEEPSTACK_METHOD)(language_model, hidden, visual_pos_masks, visual_embeds)
    rows = call.deepstack_rows.get(id(visual_embeds))
    if rows is None or rows.shape[:2] != hidden.shape[:2]:
        raise RuntimeError(
            "vtexit found no deepstack rows for this layer's slots: the text model passed features it did not see "
            "before its first layer, or the slots changed before a deepstack layer"
        )
    return hidden + rows.to(hidden.dtype)
