"""Positions of the tokens that continue a prompt the patch changed: after a renumbering (PyramidDrop-style events
move later tokens down) and after a reduction before the language model (layer 0's cache holds fewer slots than
the prompt had), on dynamic and static caches alike."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtexit.core.call_state import PrefillRecord


def reduced_prompt_positions(
    record: PrefillRecord | None, args: tuple, kwargs: dict, past_length: Callable[[], int | torch.Tensor]
) -> tuple | None:
    """The core's arguments for a call continuing a prompt reduced before the language model, when the caller
    passed no ``position_ids``: transformers would number the new tokens from layer 0's cache, which holds only the
    reduced prompt, while the engine renumbers positions of the full prompt (as generate passes them). The new tokens
    get the full prompt's next positions (``past_length()``: an int, or a 0-dim tensor on a static cache), as
    transformers numbers an unpatched model's. None: nothing to change."""
    if record is None or not record.reduces_prompt or kwargs.get("position_ids") is not None:
        return None
    tensor = kwargs.get("input_ids", args[0] if args else None)
    tensor = tensor if tensor is not None else kwargs["inputs_embeds"]
    kwargs = dict(kwargs)
    kwargs["position_ids"] = (torch.arange(tensor.shape[1], device=tensor.device) + past_length()).unsqueeze(0)
    return args, kwargs


def renumber_decode(language_model, memo: dict, stage: int, shift: torch.Tensor | None, hidden, kwargs: dict) -> None:
    """Decode positions of a stage's layers after renumbering, and their cos/sin from the language model's rotary
    embedding (written into ``kwargs``, memoised once per stage). A stage without a ``shift`` keeps them."""
    if shift is None:
        return
    key = ("decode positions", stage)
    if key not in memo:
        positions = kwargs["position_ids"] - shift
        memo[key] = (positions, language_model.rotary_emb(hidden, positions))
    kwargs["position_ids"], kwargs["position_embeddings"] = memo[key]
