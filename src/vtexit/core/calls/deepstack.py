"""Qwen3-VL's deepstack features under a reduced prompt: the text model adds visual features from inner tower layers
to the output of its first decoder layers, one row per visual token of the full prompt. When the prompt was
reduced before the language model, each kept visual slot gets its own token's row and the dropped tokens' rows go
unused, as if the model had been given the reduced prompt and the kept tokens' features."""

from __future__ import annotations

import torch

from vtexit.core.engine_state import EngineState
from vtexit.core.transformers_compat import DEEPSTACK_METHOD


def deepstack_on_layout(
    engine: EngineState, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """The text model's deepstack step for the slots the running prefill holds (the family's own step when they are
    the full prompt). Dense: each slot adds its visual token's row, or a zero row; no host read."""
    call = engine.current_call
    if call is None or call.mode != "prefill" or call.stage < 0:
        language_model = engine.parts.language_model
        return getattr(type(language_model), DEEPSTACK_METHOD)(language_model, hidden, visual_pos_masks, visual_embeds)
    mask = visual_pos_masks.to(hidden.device)
    rows = visual_embeds.shape[0]
    rank = torch.where(mask, mask.flatten().long().cumsum(0).view_as(mask) - 1, rows)
    layout = call.layout
    row_of_slot = torch.where(layout.valid, rank.gather(1, layout.index), rows)
    table = torch.cat([visual_embeds.to(hidden.device, hidden.dtype), hidden.new_zeros(1, hidden.shape[-1])])
    return hidden + table[row_of_slot]
