"""An eager prefill: the one host read at its start, and what happens at each layer boundary (the policy's event,
the gather of the kept slots, and the layer's mask, positions and rotary cos/sin for the new layout).

Kept tokens keep their original positions unless the policy renumbers them. Each conversion of a sequence-aligned
kwarg is memoised once per stage: the text model passes the same objects to every layer (or one per layer type).
"""

from __future__ import annotations

from typing import Any

import torch

from vtexit.core.attention_scores import query_attention, rotated_keys
from vtexit.core.call_state import CallState, Stage
from vtexit.core.calls.arguments import join_hidden, split_hidden
from vtexit.core.calls.deepstack import merged_deepstack
from vtexit.core.engine_state import EngineState
from vtexit.core.guards import has_media_inputs
from vtexit.core.host_read import read_checks
from vtexit.core.layout import Layout, gather_sequence
from vtexit.core.masks import media_block_ids
from vtexit.core.policy import PREFILL_CHECKS, PrefillView
from vtexit.core.static_cache import is_static, size_compacted_layer
from vtexit.core.transformers_compat import Cache, find_cache, rotary_embeddings, with_cache


def start_prefill(engine: EngineState, cache, static: bool, input_ids: torch.Tensor, padding, kwargs: dict) -> bool:
    """Set up this thread's prefill of a prompt with ``input_ids``; False when it holds no media (left alone)."""
    media = engine.media_mask(input_ids)
    batch, length = input_ids.shape
    layout = Layout.full(padding, batch, length, input_ids.device, engine.positions(batch, length, input_ids.device))
    draft = _draft_length(engine, length)
    # The one host read of a prefill, with as few kernels as can be (host time counts at batch 1): is there media;
    # on a static cache, is it filled. Whether a row ends in media is read with the first compaction event (one
    # read either way), or here when in-layer forwards change visual rows from the first layer on. The policy's
    # own questions about the prompt ride along (Policy.prefill_checks).
    checks = {"media": media.any()}
    if engine.replaced:
        checks["ends in media"] = prompt_ends_in_media(media, layout, draft)
    filled = cache.get_seq_length() if static else 0  # an int 0 before a static cache's first use
    if isinstance(filled, torch.Tensor):
        checks["filled"] = filled > 0
    asked = engine.policy.prefill_checks(media, layout)
    if len(asked) > PREFILL_CHECKS or set(asked) & set(checks):
        raise ValueError(
            f"{type(engine.policy).__name__}.prefill_checks returned {sorted(asked)}: at most {PREFILL_CHECKS} "
            f"checks, none named {sorted(checks)}"
        )
    checks.update(asked)
    read = dict(zip(checks, read_checks(list(checks.values())), strict=True))
    if read.get("filled"):
        raise ValueError(
            "media inputs arrived with a non-empty static cache: a new prompt on a filled cache (reset() it "
            "first), or chunked prefill with media after the first chunk (not supported by vtexit)"
        )
    if not read["media"]:
        return False
    if not has_media_inputs(kwargs):
        raise ValueError(
            "input_ids hold visual tokens but the call passed no pixel inputs (pixel_values or the like): the model "
            "would read the visual tokens as plain text embeddings. Pass the processor's pixel inputs with the prompt"
        )
    if read.get("ends in media"):
        raise ends_in_media_error()
    block_ids = None
    if engine.family.media_blocks is not None and kwargs.get(engine.family.media_blocks) is not None:
        block_ids = media_block_ids(kwargs[engine.family.media_blocks]).to(input_ids.device)
    call = CallState(
        mode="prefill",
        padding=padding,
        media=media,
        block_ids=block_ids,
        layout=layout,
        full_valid=layout.valid,
        stage_of_layer=[-1] * engine.num_layers,
        grid_inputs={"input_ids": input_ids, **{name: kwargs.get(name) for name in engine.family.grid_inputs}},
        use_cache=kwargs.get("use_cache"),
        checks={name: read[name] for name in asked},
        draft_length=draft,
    )
    engine.current_call = call
    if engine.planned_withdrawal is not None:
        # Planned now (the event's one host read, with the last-token check), so that decoder layers compiled
        # with fullgraph=True run it without a graph break.
        check = prompt_ends_in_media(media, layout, draft)
        kept, source, row_ends_in_media = layout.select(layout.valid & ~media, check)
        if row_ends_in_media:
            raise ends_in_media_error()
        call.planned = {engine.planned_withdrawal: (kept, source)}
    return True


def prefill_layer(engine: EngineState, layer_idx: int, call: CallState, args: tuple, kwargs: dict):
    """The arguments of decoder layer ``layer_idx`` in a prefill: after the policy's event here, if any, its hidden
    states hold the kept slots and its kwargs describe them. None: the layer runs as called."""
    hidden, rest, in_kwargs = split_hidden(args, kwargs)
    if layer_idx == engine.first_hooked_layer:
        cache = find_cache(kwargs)
        # Some families pass use_cache to their layers, others only to the core (Qwen3-VL, Gemma3).
        wants_cache = kwargs.get("use_cache", call.use_cache)
        if cache is None and wants_cache and not engine.parts.layers[layer_idx].training:
            raise _lost_cache_error(layer_idx)
        call.cache = cache if isinstance(cache, Cache) else None
        call.static_prefill = is_static(call.cache)  # once: a cache's is_compileable reads every layer
        engine.follow_model(hidden)
    event = None
    if call.planned is not None:
        event = call.planned.get(layer_idx)
    elif engine.event_layers is None or layer_idx in engine.event_layers:
        event, hidden = _policy_event(engine, layer_idx, call, hidden)
    if event is not None:
        call.layout, source = event
        hidden = compact_hidden(hidden, source, call.layout)
        if engine.renumbers_at(layer_idx):
            call.renumbered = call.layout
        call.stages.append(Stage(call.layout, _position_shift(call)))  # its counts: when a cost is read
        call.stage += 1
    call.stage_of_layer[layer_idx] = call.stage
    if call.stage < 0:
        return None if event is None else join_hidden(hidden, rest, kwargs, in_kwargs)
    if call.static_prefill:  # before the layer's first write: its buffers hold what it keeps
        size_compacted_layer(call.cache, layer_idx, call.layout.index.shape[1], call.media.shape[1])
    kwargs = compacted_kwargs(engine, layer_idx, call, hidden, kwargs)
    return join_hidden(hidden, rest, kwargs, in_kwargs)


def _policy_event(engine: EngineState, layer_idx: int, call: CallState, hidden: torch.Tensor):
    """Ask the policy before ``layer_idx``: ((layout, source) or None, the hidden states the kept slots carry).

    The policy sees the prompt alone: draft tokens that speculative decoding verifies in the same call (the last
    slots) are hidden from it and always kept, so it decides as in a plain prefill of the prompt."""
    draft = call.draft_length
    view = PrefillView(
        layer_idx,
        call.layout,
        call.media,
        hidden,
        scores=call.scores,
        state=call.policy_state,
        key_states=call.key_states,
        grid_inputs=call.grid_inputs,
    )
    if draft:
        positions = call.media.shape[1] - draft
        view.layout = prompt_slots(call.layout, draft)
        view.media_original = call.media[:, :positions]
        view.hidden_states = hidden[:, : view.layout.length]
        view.scores = {layer: s[:, :positions] for layer, s in call.scores.items()}
        view.key_states = {layer: k[:, :positions] for layer, k in call.key_states.items()}
    keep = engine.policy.keep(view)
    if keep is None:
        return None, hidden
    # Qwen3-VL's deepstack rows merged as the hidden states are.
    deepstack = merged_deepstack(engine, call, view, keep) if call.deepstack is not None and layer_idx == 0 else None
    first = call.stage < 0 and not engine.replaced  # whether a row ends in media is read now (see start_prefill)
    check = prompt_ends_in_media(call.media, call.layout, draft) if first else None
    merged = engine.policy.merge(view, keep)
    if draft:
        keep = torch.cat([keep.to(torch.bool), keep.new_ones(keep.shape[0], draft, dtype=torch.bool)], dim=1)
        merged = None if merged is None else torch.cat([merged, hidden[:, -draft:]], dim=1)
    hidden = hidden if merged is None else merged
    layout, source, row_ends_in_media = call.layout.select(keep, check)
    if row_ends_in_media:
        raise ends_in_media_error()
    if deepstack is not None:
        call.deepstack_rows = {key: compact_hidden(rows, source, layout) for key, rows in deepstack.items()}
    return (layout, source), hidden


def _position_shift(call: CallState) -> torch.Tensor | None:
    """(batch, 1) positions the renumbering events so far removed (what decode tokens move down by)."""
    if call.renumbered is None:
        return None
    return (call.full_valid.sum(1) - call.renumbered.valid.sum(1)).unsqueeze(1)


def compacted_kwargs(engine: EngineState, layer_idx: int, call: CallState, hidden: torch.Tensor, kwargs: dict) -> dict:
    """Rewrite the full-sequence kwargs of a decoder layer for the current layout."""
    kwargs = dict(kwargs)
    index = call.layout.index
    if call.renumbered is not None:
        kwargs["position_ids"], kwargs["position_embeddings"] = _renumbered(engine, layer_idx, call, hidden, kwargs)
    else:
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = _memo(
                call, kwargs["position_embeddings"], lambda pe: tuple(gather_sequence(t, index, -2) for t in pe)
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _memo(call, kwargs["position_ids"], lambda p: gather_sequence(p, index, -1))
    block_ids = None
    if call.block_ids is not None:  # once per stage, like the mask it feeds
        key = ("block ids", call.stage)
        if key not in call.memo:
            call.memo[key] = torch.where(call.layout.valid, call.block_ids.gather(1, index), -1)
        block_ids = call.memo[key]
    key_padding = call.layout.valid if call.layout.padded else None
    kwargs["attention_mask"] = engine.layer_mask(layer_idx, call, hidden, key_padding, call.cache, block_ids)
    return kwargs


def _renumbered(engine: EngineState, layer_idx: int, call: CallState, hidden: torch.Tensor, kwargs: dict):
    """Positions after dropping: each kept token moves down by the number of real tokens dropped before it at
    renumbering events (a later event that keeps positions, e.g. VTW after a pre-LLM step, moves nothing); their
    cos/sin as the text model computes them for this layer's attention type."""
    layer_type = engine.layer_types[layer_idx]
    key = ("renumbered", call.stage, layer_type)
    if key not in call.memo:
        layout, renumbered = call.layout, call.renumbered
        original = gather_sequence(kwargs["position_ids"], layout.index, -1).expand(layout.index.shape)
        valid_before = call.full_valid.cumsum(1) - call.full_valid.long()
        # Per original position: how many of the renumbered layout's tokens come before it.
        kept = torch.zeros_like(call.full_valid).scatter(1, renumbered.index, renumbered.valid)
        kept_before = kept.cumsum(1) - kept.long()
        positions = original - (valid_before - kept_before).gather(1, layout.index)
        rotary = engine.parts.language_model.rotary_emb
        call.memo[key] = (positions, rotary_embeddings(rotary, hidden, positions, layer_type))
    return call.memo[key]


def _memo(call: CallState, obj: Any, convert) -> Any:
    # Conversions are memoised by identity, once per stage: the text model passes the same objects to every
    # layer (or one per layer type), so each is gathered once per forward. While tracing, each layer converts
    # (Dynamo in torch 2.11 cannot trace id() of a tuple; the compiled graph dedupes the gathers anyway).
    if torch.compiler.is_compiling():
        return convert(obj)
    key = (id(obj), call.stage)
    hit = call.memo.get(key)
    if hit is None or hit[0] is not obj:
        hit = (obj, convert(obj))
        call.memo[key] = hit
    return hit[1]


def record_attention(engine: EngineState, layer_idx: int, module, args: tuple, kwargs: dict) -> None:
    """Before a watched attention module in a prefill: keep the keys and the last prompt token's attention the
    policy asked for (``key_layers``, ``attention_layers``), per original position, so that a policy can read them
    after later layout changes."""
    call = engine.current_call
    if call is None or call.mode != "prefill":
        return
    hidden = args[0] if args else kwargs["hidden_states"]
    if layer_idx in engine.policy.key_layers:
        keys = rotated_keys(module, hidden, kwargs["position_embeddings"])
        keys = keys.transpose(1, 2).flatten(2)  # (batch, slots, kv heads x head_dim)
        store = keys.new_zeros(*call.full_valid.shape, keys.shape[-1])
        index = call.layout.index.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
        call.key_states[layer_idx] = store.scatter(1, index, keys * call.layout.valid[..., None].to(keys.dtype))
    if layer_idx not in engine.policy.attention_layers:
        return
    last = prompt_slots(call.layout, call.draft_length).last_slot.to(torch.long).argmax(dim=1, keepdim=True)
    probs = query_attention(module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), last)
    probs = probs.squeeze(1)
    scores = torch.zeros_like(call.full_valid, dtype=probs.dtype)
    call.scores[layer_idx] = scores.scatter(1, call.layout.index, probs * call.layout.valid)


def replay(
    engine: EngineState,
    layer_inputs: list[tuple[torch.Tensor, dict]],
    start: int,
    keep: torch.Tensor,
    padding: torch.Tensor | None,
) -> tuple[torch.Tensor, Layout]:
    """Run layers ``start..N-1`` on the kept positions only, from recorded full-sequence layer inputs (see
    :meth:`vtexit.core.engine.ScheduleEngine.replay`)."""
    hidden, _ = layer_inputs[start]
    batch, length = hidden.shape[:2]
    call = CallState(mode="prefill", padding=padding)
    full = Layout.full(padding, batch, length, hidden.device)
    call.layout, source, _ = full.select(keep)
    call.full_valid = full.valid
    call.stage = 0
    hidden = compact_hidden(hidden, source, call.layout)
    for j in range(start, engine.num_layers):
        layer = engine.parts.layers[j]
        kwargs = with_cache(compacted_kwargs(engine, j, call, hidden, layer_inputs[j][1]), layer, None)
        kwargs["use_cache"] = False
        hidden = layer(hidden, **kwargs)
    return hidden, call.layout


def compact_hidden(hidden: torch.Tensor, source: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Gather the kept slots of ``hidden``; pad slots (only when rows kept different numbers) are zeroed so they
    stay finite through the layers."""
    kept = gather_sequence(hidden, source, seq_dim=1)
    return kept * layout.valid.unsqueeze(-1).to(hidden.dtype) if layout.padded else kept


def ends_in_media(media: torch.Tensor, layout: Layout) -> torch.Tensor:
    """0-dim bool: whether some row's last real prompt token (the one that predicts the next) is a media token."""
    return (media & layout.last_slot).any()


def prompt_ends_in_media(media: torch.Tensor, layout: Layout, draft: int) -> torch.Tensor:
    """:func:`ends_in_media` for the prompt of a full layout whose last ``draft`` slots are draft tokens."""
    return ends_in_media(media[:, : media.shape[1] - draft], prompt_slots(layout, draft))


def prompt_slots(layout: Layout, draft: int) -> Layout:
    """The slots of the prompt: all but the last ``draft`` (draft tokens of speculative decoding are text, kept by
    every event, so they stay the last slots of every layout)."""
    if not draft:
        return layout
    return Layout(layout.index[:, :-draft], layout.valid[:, :-draft], padded=layout.padded)


def _draft_length(engine: EngineState, length: int) -> int:
    """Draft tokens after the prompt in a prefill of ``length`` tokens: speculative decoding (prompt lookup, an
    assistant model) verifies its first drafts in the call that fills the cache. The prompt's length comes from
    the ``generate`` call running in this thread (0 outside one)."""
    prompt_length = getattr(engine.thread_state, "generate_prompt_length", None)
    return length - prompt_length if prompt_length is not None and length > prompt_length else 0


def ends_in_media_error() -> ValueError:
    return ValueError(
        "a prompt row ends in a visual token: the last prompt token predicts the next one and would be withdrawn. "
        "Put text after the image (e.g. the chat template's generation prompt). With chunked prefill "
        "(generate(prefill_chunk_size=...)) a chunk can end inside an image: vtexit does not support chunked prefill."
    )


def _lost_cache_error(layer_idx: int) -> RuntimeError:
    return RuntimeError(
        f"vtexit found no cache among decoder layer {layer_idx}'s arguments although the call asked for one "
        "(use_cache=True): this transformers release passes the KV cache in a way vtexit does not know (see "
        "vtexit.core.transformers_compat), and the cache would be lost to the patch"
    )
