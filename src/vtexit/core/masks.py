"""Attention masks for compacted layers, rebuilt with transformers' own mask functions.

Rebuilding (rather than slicing the model's mask) keeps prefill and decode consistent: the mask functions size
keys from the layer's own cache, so a layer that cached fewer positions gets a mask of its own width, and a
sliding-window layer counts its window in cached entries exactly as its cache does.

Families whose media tokens attend to each other both ways (Gemma3: one bidirectional block per image) pass
*block ids* per slot of the current layout, so the blocks follow every drop instead of being lost.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig

from vtexit.core.transformers_compat import Cache, blockwise_overlay, causal_mask, sliding_window_overlay

SLIDING_TYPES = frozenset({"sliding_attention"})
SUPPORTED_TYPES = frozenset({"full_attention", "sliding_attention"})


def layer_types(text_config: PretrainedConfig) -> list[str]:
    """Attention type of every decoder layer ("full_attention" when the config does not say)."""
    n = text_config.num_hidden_layers
    types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * n)
    return types[:n]


def media_block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Block id per position: one id per run of consecutive media tokens (``token_type_ids == 1``), -1 for text.

    This is how Gemma3 marks the image blocks inside which attention is bidirectional.
    """
    is_media = token_type_ids == 1
    starts = is_media & ~F.pad(is_media, (1, 0), value=False)[:, :-1]
    return torch.where(is_media, torch.cumsum(starts.int(), dim=1) - 1, -1)


def rebuild_mask(
    text_config: PretrainedConfig,
    layer_type: str,
    hidden_states: torch.Tensor,
    key_padding: torch.Tensor | None,
    cache: Cache | None,
    layer_idx: int,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The causal mask of ``layer_idx`` for queries ``hidden_states`` and keys described by ``key_padding``.

    ``key_padding`` is the 2D (batch, keys seen so far + queries) validity of the layer's keys, or None when every
    key is valid (then SDPA may run with ``is_causal`` and no mask). With a padding mask, transformers' check
    whether the mask could be skipped would read the device (a host sync per call); padded keys need the mask
    anyway, so it is not asked. ``block_ids``
    (batch, keys), if given, marks bidirectional media blocks per key slot (-1 = causal text). Position ids are
    deliberately not passed: gathered positions have gaps, which mask creation would read as packed sequences.
    """
    if layer_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"layer {layer_idx} has attention type {layer_type!r}; vtexit supports {sorted(SUPPORTED_TYPES)}"
        )
    base = (text_config, hidden_states, key_padding, cache)  # causal_mask passes no position ids
    sliding = layer_type in SLIDING_TYPES
    if block_ids is None:
        return causal_mask(*base, sliding=sliding, layer_idx=layer_idx, allow_is_causal_skip=key_padding is None)
    if not sliding:
        return causal_mask(*base, layer_idx=layer_idx, block_sequence_ids=block_ids)
    # As Gemma3 composes it: AND(sliding window, OR(causal, blockwise)).
    return causal_mask(
        *base,
        layer_idx=layer_idx,
        or_mask_function=blockwise_overlay(block_ids),
        and_mask_function=sliding_window_overlay(text_config.sliding_window),
    )
