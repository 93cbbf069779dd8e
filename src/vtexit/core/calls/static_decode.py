"""Calls continuing a static cache this patch filled (``generate(..., cache_implementation="static")``, and
transformers' compiled decode).

A prefill on a static cache leaves a plan beside the cache (:mod:`vtexit.core.static_cache`): per layer, the slots
it holds, as fixed tensors. Each decode layer derives its mask (and renumbered positions) from the plan with no host
read and no Python state, so that under ``torch.compile`` the whole decode step stays one graph.
"""

from __future__ import annotations

from vtexit.core.call_state import CallState
from vtexit.core.calls.arguments import sequence_length
from vtexit.core.calls.decode_positions import reduced_prompt_positions, renumber_decode
from vtexit.core.engine_state import EngineState
from vtexit.core.guards import has_media_inputs
from vtexit.core.static_cache import StaticPlan, is_static, plan_of
from vtexit.core.transformers_compat import find_cache, static_layer_length


def static_decode_plan(engine: EngineState, kwargs: dict) -> StaticPlan | None:
    """The plan of a static cache this patch filled, when this call continues it (no media inputs)."""
    cache = find_cache(kwargs)
    if not is_static(cache):
        return None
    plan = plan_of(cache)
    if plan is None or plan.owner is not engine or has_media_inputs(kwargs):
        return None
    return plan


def traced_decode_plan(engine: EngineState, kwargs: dict) -> StaticPlan | None:
    """Under compilation: the plan of a decode step that traces without Python state. Methods that replace layer
    forwards (YOPO's in-layer strategies) read per-call state in decode, so their steps take the eager hooks
    (graph breaks: exact, slower)."""
    plan = static_decode_plan(engine, kwargs)
    if plan is None or (engine.replaced and plan.record is not None):
        return None
    return plan


def enter_static_decode(engine: EngineState, plan: StaticPlan, input_ids, kwargs: dict) -> None:
    """A call continuing a static cache this patch filled (no host read: the plan says what each layer holds)."""
    if plan.record is None:
        engine.thread_state.last_layout = None
        return
    engine.current_call = CallState(
        mode="decode",
        padding=None,
        query_length=sequence_length(input_ids, kwargs.get("inputs_embeds")),
        record=plan.record,
        static=plan,
    )


def static_decode_layer(
    engine: EngineState, plan: StaticPlan, layer_idx: int, args: tuple, kwargs: dict, memo: dict | None
):
    """A decode layer on a static cache: its mask (and renumbered positions) from the plan's fixed tensors.
    Traceable: under compilation ``memo`` is None and each layer derives its mask (a few fused element ops)."""
    stage = plan.stage_of_layer[layer_idx]
    if stage < 0:
        return None
    memo = {} if memo is None else memo
    kwargs = dict(kwargs)
    key = ("static mask", stage)
    hidden = args[0] if args else kwargs["hidden_states"]
    if key not in memo:
        memo[key] = plan.layer_mask(layer_idx, kwargs.get("attention_mask"), find_cache(kwargs), hidden.shape[1])
    kwargs["attention_mask"] = memo[key]
    renumber_decode(
        engine.parts.language_model,
        memo,
        stage,
        engine.layer_types[layer_idx],
        plan.stages[stage].position_shift,
        hidden,
        kwargs,
    )
    return args, kwargs


def static_decode_positions(plan: StaticPlan, args: tuple, kwargs: dict, grid_offset=None) -> tuple | None:
    """:func:`~vtexit.core.calls.decode_positions.reduced_prompt_positions` on a static cache: the full prompt's
    past length from the slots layer 0 has written (a 0-dim tensor; no host read)."""
    past = lambda: static_layer_length(find_cache(kwargs).layers[0]) + plan.record.dropped_before_layer0  # noqa: E731
    return reduced_prompt_positions(plan.record, args, kwargs, past, grid_offset)
