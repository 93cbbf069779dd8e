"""Gemma 3: sliding/full attention layers, SigLIP pooled to 16 soft tokens, bidirectional image tokens."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    PretrainedConfig,
    SiglipVisionConfig,
)

from vtexit.testing.config_kwargs import INIT_STD, TEXT_HEAD_DIM, Overrides, text_kwargs, vit_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "Gemma3InputSpec", "gemma3_config"]


def gemma3_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    # sliding, full, sliding, full, ...: the first global layer is layer 1, and the window (8) is
    # shorter than one image (16 tokens).
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return Gemma3Config(
        text_config=Gemma3TextConfig(
            **{
                **text_kwargs(n, v),
                "head_dim": TEXT_HEAD_DIM,
                "query_pre_attn_scalar": TEXT_HEAD_DIM,
                "sliding_window": 8,
                "layer_types": layer_types,
                **text,
            }
        ),
        # 8x8 patches average-pooled 2x2 into 16 tokens per image
        vision_config=SiglipVisionConfig(**{**vit_kwargs(16, 2), "vision_use_head": False, **vision}),
        **{
            "mm_tokens_per_image": 16,
            "boi_token_index": v.start,
            "eoi_token_index": v.end,
            "image_token_index": v.image,
            "initializer_range": INIT_STD,
            "tie_word_embeddings": False,
            **top,
        },
    )


class Gemma3InputSpec(InputSpec):
    """``<start_of_image>`` + ``mm_tokens_per_image`` soft tokens + ``<end_of_image>``, and
    ``token_type_ids`` marking image tokens (they attend to each other bidirectionally)."""

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        self.size = config.vision_config.image_size
        self.tokens = config.mm_tokens_per_image

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        ids = [self.vocab.start] + [self.vocab.image] * self.tokens + [self.vocab.end]
        return MediaBlock("image", ids, {"pixels": random_pixels(gen, 3, self.size, self.size)})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        images = blocks_of_kind(rows, "image")
        return {"pixel_values": torch.stack([b.payload["pixels"] for b in images])} if images else {}

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.vocab.image).long()}


FAMILY = TinyFamily("gemma3", gemma3_config, Gemma3ForConditionalGeneration, Gemma3InputSpec)
