"""Attention masks for compacted layers, rebuilt with transformers' own mask functions.

Rebuilding (rather than slicing the model's mask) keeps prefill and decode consistent: the mask functions size
keys from the layer's own cache, so a layer that cached fewer positions gets a mask of its own width, and a
sliding-window layer counts its window in cached entries exactly as its cache does.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

SLIDING_TYPES = frozenset({"sliding_attention"})
SUPPORTED_TYPES = frozenset({"full_attention", "sliding_attention"})


def layer_types(text_config: PretrainedConfig) -> list[str]:
    """Attention type of every decoder layer ("full_attention" when the config does not say)."""
    n = text_config.num_hidden_layers
    types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * n)
    return types[:n]


def rebuild_mask(
    text_config: PretrainedConfig,
    layer_type: str,
    hidden_states: torch.Tensor,
    key_padding: torch.Tensor,
    cache: Cache | None,
    layer_idx: int,
) -> torch.Tensor | None:
    """The causal mask of ``layer_idx`` for queries ``hidden_states`` and keys described by ``key_padding``.

    ``key_padding`` is the 2D (batch, keys seen so far + queries) validity of the layer's keys. Position ids are
    deliberately not passed: gathered positions have gaps, which mask creation would read as packed sequences.
    """
    if layer_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"layer {layer_idx} has attention type {layer_type!r}; vtexit supports {sorted(SUPPORTED_TYPES)}"
        )
    make = create_sliding_window_causal_mask if layer_type in SLIDING_TYPES else create_causal_mask
    return make(
        config=text_config,
        inputs_embeds=hidden_states,
        attention_mask=key_padding,
        past_key_values=cache,
        position_ids=None,
        layer_idx=layer_idx,
    )
