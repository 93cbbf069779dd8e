"""Positions of the tokens that continue a prompt the patch changed: after a renumbering (PyramidDrop-style events
move later tokens down) and after a reduction before the language model (layer 0's cache holds fewer slots than
the prompt had), on dynamic and static caches alike."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtexit.core.call_state import PrefillRecord
from vtexit.core.transformers_compat import rotary_embeddings


def reduced_prompt_positions(
    record: PrefillRecord | None,
    args: tuple,
    kwargs: dict,
    past_length: Callable[[], int | torch.Tensor],
    grid_offset: Callable[[], torch.Tensor | None] | None = None,
) -> tuple | None:
    """The core's arguments for a call continuing a prompt reduced before the language model, when the caller
    passed no ``position_ids``: transformers would number the new tokens from layer 0's cache, which holds only the
    reduced prompt. The new tokens get the full prompt's next positions (``past_length()``: an int, or a 0-dim
    tensor on a static cache), as transformers numbers an unpatched model's.

    ``grid_offset`` (multimodal RoPE only): the family's stored (batch, 1) offset of text positions after the image
    grids. With an attention mask the family numbers new tokens from it (the full prompt's, as the caller passes
    it); without one, from the cache, so the positions are given here: past length + offset, in all three rows.
    None: nothing to change."""
    if record is None or not record.reduces_prompt or kwargs.get("position_ids") is not None:
        return None
    if grid_offset is not None and kwargs.get("attention_mask") is not None:
        return None
    tensor = kwargs.get("input_ids", args[0] if args else None)
    tensor = tensor if tensor is not None else kwargs["inputs_embeds"]
    kwargs = dict(kwargs)
    positions = (torch.arange(tensor.shape[1], device=tensor.device) + past_length()).unsqueeze(0)
    if grid_offset is not None:
        offset = grid_offset()
        if offset is None:
            raise ValueError(
                "this call continues a prompt reduced before the language model on a model with multimodal RoPE, "
                "but the model keeps no offset of its grid positions: pass position_ids (the full prompt's next ones)"
            )
        positions = (positions + offset.to(tensor.device)).unsqueeze(0).expand(3, -1, -1)
    kwargs["position_ids"] = positions
    return args, kwargs


def renumber_decode(
    language_model, memo: dict, stage: int, layer_type: str, shift: torch.Tensor | None, hidden, kwargs: dict
) -> None:
    """Decode positions of a stage's layers after renumbering, and their cos/sin from the language model's rotary
    embedding for the layer's attention type (written into ``kwargs``, memoised once per stage and type). A stage
    without a ``shift`` keeps them."""
    if shift is None:
        return
    key = ("decode positions", stage, layer_type)
    if key not in memo:
        positions = kwargs["position_ids"] - shift
        memo[key] = (positions, rotary_embeddings(language_model.rotary_emb, hidden, positions, layer_type))
    kwargs["position_ids"], kwargs["position_embeddings"] = memo[key]
