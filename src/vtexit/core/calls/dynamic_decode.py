"""Calls on a non-empty dynamic cache: decode steps (or continued text) after a prefill this patch compacted.

New tokens are text and their positions come from ``generate`` unchanged; only each layer's key columns differ,
because layers after an event cached fewer positions (``DynamicCache`` keeps one entry per layer).
"""

from __future__ import annotations

from vtexit.core.call_state import CallState, decode_key_padding
from vtexit.core.calls.arguments import sequence_length
from vtexit.core.calls.decode_positions import renumber_decode
from vtexit.core.engine_state import EngineState
from vtexit.core.guards import has_media_inputs
from vtexit.core.transformers_compat import Cache, find_cache


def enter_continuation(engine: EngineState, cache: Cache, kwargs: dict, input_ids, padding, past_length: int) -> None:
    """A call on a non-empty cache: decode (or continued text) after our prefill, or an untouched call."""
    if has_media_inputs(kwargs):
        raise ValueError(
            "media inputs arrived with a non-empty cache: a later turn with new images, or chunked prefill "
            "(generate(prefill_chunk_size=...)) with an image after the first chunk. vtexit supports media "
            "only in one prefill on an empty cache; chunked prefill and multi-turn images are not supported."
        )
    with engine.lock:
        record = engine.records.get(cache)
    if record is None:
        engine.thread_state.last_layout = None  # a cache vtexit did not compact: every layer holds every position
        return
    query_length = sequence_length(input_ids, kwargs.get("inputs_embeds"))
    past_length += record.dropped_before_layer0  # a pre-LLM reduction: layer 0 holds fewer than the prompt
    if past_length < record.prompt_length:
        # Speculative decoding rejected drafts verified with the prompt: the cache dropped them from every layer.
        record = record.without_last(record.prompt_length - past_length)
        with engine.lock:
            engine.records[cache] = record
    engine.current_call = CallState(
        mode="decode",
        padding=padding,
        past_length=past_length,
        query_length=query_length,
        record=record,
    )


def decode_layer(engine: EngineState, layer_idx: int, call: CallState, args: tuple, kwargs: dict):
    """A decoder layer's arguments in a decode step: the mask over the keys its cache holds, and renumbered
    positions where the prefill renumbered. None: the layer kept the full prompt and runs as called."""
    record = call.record
    stage = record.stage_of_layer[layer_idx]
    call.stage = stage
    if stage < 0:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    key_padding = decode_key_padding(call, stage)
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = engine.layer_mask(layer_idx, call, hidden, key_padding, find_cache(kwargs))
    renumber_decode(
        engine.parts.language_model,
        call.memo,
        stage,
        engine.layer_types[layer_idx],
        record.stages[stage].position_shift,
        hidden,
        kwargs,
    )
    return args, kwargs
