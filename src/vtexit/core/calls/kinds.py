"""Which kind of call reached the multimodal core, and what it leaves when it ends.

* a prefill: media tokens on an empty cache (:mod:`.eager_prefill`);
* a continuation: a non-empty dynamic cache this patch filled (:mod:`.dynamic_decode`);
* a static decode: a static cache this patch filled (:mod:`.static_decode`);
* untouched: anything else (no media, a cache the patch did not fill); on a static cache the calls that continue
  it are marked untouched too.

State of a call lives in a thread-local slot, and what decode needs from a prefill lives in a record keyed by the
cache it filled: several threads may run one patched model, and an older cache can be continued after another
prefill.
"""

from __future__ import annotations

from typing import Any

import torch

from vtexit.core.call_state import CallState, DecodeCostInputs, PrefillCostInputs, PrefillRecord
from vtexit.core.calls.arguments import sequence_length
from vtexit.core.calls.decode_positions import reduced_prompt_positions
from vtexit.core.calls.dynamic_decode import enter_continuation
from vtexit.core.calls.eager_prefill import start_prefill
from vtexit.core.calls.static_decode import enter_static_decode, static_decode_plan, static_decode_positions
from vtexit.core.costs import CallCost, RunCost
from vtexit.core.engine_state import EngineState
from vtexit.core.guards import has_media_inputs
from vtexit.core.static_cache import (
    attach_plan,
    build_plan,
    check_static_cache,
    full_max_length,
    is_static,
    padding_from_prepared,
    plan_of,
)
from vtexit.core.transformers_compat import Cache, find_cache


def begin_call(engine: EngineState, args: tuple, kwargs: dict) -> tuple | None:
    """Decide the kind of this core call and set up its state; returns new (args, kwargs) for the core where the
    call's positions must change (a continuation of a prompt reduced before the language model), else None."""
    engine.current_call = None
    engine.thread_state.last_call_layout = None
    cache = find_cache(kwargs)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    padding = kwargs.get("attention_mask")
    prepared = isinstance(padding, dict) or (isinstance(padding, torch.Tensor) and padding.ndim != 2)
    static = is_static(cache)
    if static:
        plan = static_decode_plan(engine, kwargs)
        if plan is not None:  # its prefill checked the cache
            enter_static_decode(engine, plan, input_ids, kwargs)
            return static_decode_positions(plan, args, kwargs, engine.grid_offset)
        check_static_cache(cache)
        other = plan_of(cache)
        if other is not None and other.owner is not engine and other.record is not None and other.record.compacted:
            raise ValueError(
                "this static cache was filled while another vtexit patch withdrew tokens; only that patch can "
                "continue it (reset() it to start again)"
            )
        if not has_media_inputs(kwargs) and int(cache.get_seq_length()) > 0:
            # A static cache filled without this patch: continued untouched (the plan spares later syncs).
            untouched_call(engine, cache)
            return None
        if prepared:
            padding = padding_from_prepared(padding, sequence_length(input_ids, kwargs.get("inputs_embeds")))
    elif prepared:
        raise ValueError(
            "vtexit needs a 2D attention_mask (got a prepared 4D mask or mask mapping); prepared masks are read "
            "only with a static cache (generate(..., cache_implementation='static'))"
        )
    elif isinstance(cache, Cache) and (past_length := cache.get_seq_length()) > 0:
        enter_continuation(engine, cache, kwargs, input_ids, padding, past_length)
        call = engine.current_call
        if call is None:
            return None
        return reduced_prompt_positions(call.record, args, kwargs, lambda: call.past_length, engine.grid_offset)
    if input_ids is None:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "vtexit finds visual tokens from input_ids, but this call passed only inputs_embeds; "
                "pass input_ids (with pixel inputs) instead"
            )
        untouched_call(engine, cache if static else None)
        return None
    if not start_prefill(engine, cache, static, input_ids, padding, kwargs):
        untouched_call(engine, cache if static else None)
    return None


def generate_under_patch(engine: EngineState, *args, **kwargs):
    """``model.generate`` while patched: the model's own ``generate``, with the prompt's length noted for this
    thread, so that a prefill that also verifies draft tokens (speculative decoding: prompt lookup, an assistant
    model) is told apart from its prompt (:func:`~vtexit.core.calls.eager_prefill.start_prefill`)."""
    model = engine.model
    prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    local = engine.thread_state
    outer = getattr(local, "generate_prompt_length", None)
    local.generate_prompt_length = prompt.shape[-1] if isinstance(prompt, torch.Tensor) else None
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        local.generate_prompt_length = outer


def untouched_call(engine: EngineState, static_cache: Cache | None) -> None:
    """A call the patch leaves alone; on a static cache, the calls that continue it are marked untouched too."""
    engine.thread_state.last_layout = None
    if static_cache is not None:
        attach_plan(static_cache, build_plan(engine, None, full_max_length(static_cache), engine.num_layers))


def end_call(engine: EngineState, output: Any) -> None:
    """After the core: a decode step adds its cost to its prefill's record; a prefill leaves its layout, policy state
    and cost, and the record its cache's later calls continue from."""
    call, engine.current_call = engine.current_call, None
    if call is None or output is None:  # None: the forward raised (always_call hooks still run); record nothing
        return
    if call.mode == "decode":
        decode = DecodeCostInputs(
            call.record,
            call.padding,
            call.past_length,
            call.query_length,
            call.fractions,
            static_keys=None if call.static is None else call.static.layer_lengths,
        )
        call.record.cost.decode.append(CallCost("decode", source=decode))
        return
    run_cost = finish_prefill(engine, call)
    if call.cache is not None:
        record = PrefillRecord(
            prompt_length=call.media.shape[1],
            media=call.media,
            full_valid=call.full_valid,
            stage_of_layer=call.stage_of_layer,
            stages=call.stages,
            cost=run_cost,
            draft_length=call.draft_length,
        )
        with engine.lock:
            engine.records[call.cache] = record
        if is_static(call.cache):
            attach_plan(call.cache, build_plan(engine, record, full_max_length(call.cache), engine.num_layers))


def finish_prefill(engine: EngineState, call: CallState) -> RunCost:
    """What a prefill leaves to the caller: its layout (logits line up with it), policy state and cost record."""
    local = engine.thread_state
    local.last_layout = call.layout
    local.last_call_layout = call.layout
    local.last_policy_state = call.policy_state
    prefill = PrefillCostInputs(call.full_valid, call.media, call.stages, call.stage_of_layer, call.fractions)
    run_cost = RunCost(prefill=CallCost("prefill", source=prefill))
    local.last_cost = run_cost
    return run_cost


def check_untouched_cache(engine: EngineState, kwargs: dict) -> None:
    """A call the core hook left alone must not reach the layers with a cache this patch compacted: that would
    mean the core hook missed the cache (e.g. a renamed keyword) and the step would run unpatched."""
    cache = find_cache(kwargs)
    if cache is None:
        return
    with engine.lock:
        record = engine.records.get(cache) if isinstance(cache, Cache) else None
    if record is not None and record.compacted:
        raise RuntimeError(
            "vtexit's core hook did not see the cache that this decoder layer got, and that cache was compacted "
            "by this patch: the step would run unpatched. This transformers release passes the cache in a way "
            "vtexit does not know; see vtexit.core.transformers_compat."
        )
