"""Toy sizes and the config kwargs every family shares, so all tiny models have the same shape."""

from __future__ import annotations

from typing import Any

from vtexit.testing.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab

__all__ = [
    "INIT_STD",
    "MAX_POSITIONS",
    "TEXT_HEADS",
    "TEXT_HEAD_DIM",
    "TEXT_HIDDEN",
    "TEXT_INTERMEDIATE",
    "TEXT_KV_HEADS",
    "VISION_HEADS",
    "VISION_HIDDEN",
    "VISION_INTERMEDIATE",
    "Overrides",
    "special_ids_kwargs",
    "text_kwargs",
    "vit_kwargs",
]

# GQA everywhere (4 query heads over 2 kv heads) because real checkpoints use it and the engine has
# to handle kv-head repetition.
TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
TEXT_INTERMEDIATE = 128
MAX_POSITIONS = 1024
VISION_HIDDEN = 32
VISION_INTERMEDIATE = 64
VISION_HEADS = 2
# Larger than the usual 0.02 so that attention is not almost uniform: with a near-uniform model,
# tests asking "does removing visual tokens change the output?" would be vacuous.
INIT_STD = 0.1

# Caller-supplied config kwargs, merged last so they win over the family defaults.
Overrides = dict[str, Any]


def special_ids_kwargs() -> dict[str, Any]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def text_kwargs(num_layers: int, vocab: Vocab) -> dict[str, Any]:
    """Language-model kwargs common to every family's text config."""
    return {
        "vocab_size": vocab.size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        **special_ids_kwargs(),
    }


def vit_kwargs(image_size: int, patch_size: int) -> dict[str, Any]:
    """A one-block ViT (CLIP / SigLIP / InternViT / Idefics3 vision configs)."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": VISION_HEADS,
        "image_size": image_size,
        "patch_size": patch_size,
    }
