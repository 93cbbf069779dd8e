"""A prefill under ``torch.compile`` of the whole model whose withdrawal is planned from shapes alone, so that the
compacted layers trace with a length the compiler knows and without a graph break.

It serves VTW-like policies (``Policy.withdraw_media_at``) on batch-1 prompts of families that count their visual
tokens from the pixel inputs; every other call takes the eager hooks, which break the graph and stay exact.
"""

from __future__ import annotations

import torch

from vtexit.core.call_state import CallState
from vtexit.core.calls.eager_prefill import ends_in_media_error
from vtexit.core.engine_state import EngineState
from vtexit.core.layout import Layout
from vtexit.core.transformers_compat import find_cache


def start_traced_prefill(engine: EngineState, args: tuple, kwargs: dict) -> bool:
    """Start a traced prefill for this core call (the visual tokens counted from the pixel inputs, checked on the
    device against ``input_ids`` later). False when the call needs the eager hooks: another method, a batch of
    several rows, a cache to fill (its record for decode is kept in Python), or a family that does not count its
    tokens from shapes."""
    layer = engine.planned_withdrawal
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    padding = kwargs.get("attention_mask")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(engine.text_config, "use_cache", True)
    if (
        layer is None
        or engine.family.media_count is None
        or engine.family.media_blocks is not None
        or not isinstance(input_ids, torch.Tensor)
        or input_ids.shape[0] != 1
        or use_cache
        or find_cache(kwargs) is not None
        or (padding is not None and (not isinstance(padding, torch.Tensor) or padding.ndim != 2))
    ):
        return False
    count = engine.family.media_count(engine.model.config, kwargs)
    if not count or count >= input_ids.shape[1]:
        return False
    # No tensor work here: the plan is made at the first hooked layer, inside the language model's graph (a
    # hook's own ops would make a graph of their own wherever the model's forward already breaks).
    engine.current_call = CallState(
        mode="prefill",
        padding=padding,
        stage_of_layer=[-1] * engine.num_layers,
        grid_inputs={"input_ids": input_ids},
        use_cache=False,
        traced=True,
        traced_media_count=count,
    )
    return True


def plan_traced_prefill(engine: EngineState, call: CallState) -> None:
    """The plan of a traced prefill, checked on the device: the visual tokens in ``input_ids`` must be as many as
    the pixel inputs give, and the last prompt token must be text."""
    input_ids, count = call.grid_inputs["input_ids"], call.traced_media_count
    length = input_ids.shape[1]
    media = engine.media_mask(input_ids)
    layout = Layout.full(call.padding, 1, length, input_ids.device)
    torch._assert_async(
        media.sum() == count,
        "vtexit: the prompt's visual tokens do not match its pixel inputs (a compiled prefill plans with them)",
    )
    last = layout.valid.long().cumsum(1).argmax(dim=1, keepdim=True)  # Layout.last_slot takes a lock (3.11)
    torch._assert_async(~media.gather(1, last).any(), ends_in_media_error().args[0])
    # Text slots first, in order (a stable sort of the media flags), then the visual slots, cut off.
    source = torch.sort(media, dim=1, stable=True).indices[:, : length - count]
    kept = Layout(layout.index.gather(1, source), layout.valid.gather(1, source), padded=layout.padded)
    call.media, call.layout, call.full_valid = media, layout, layout.valid
    call.planned = {engine.planned_withdrawal: (kept, source)}
