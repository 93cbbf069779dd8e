"""InternVL: Qwen2 + InternViT with pixel shuffle; images are 1 tile or 2 crops + thumbnail."""

from __future__ import annotations

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PretrainedConfig,
    Qwen2Config,
)

from vtexit.testing.config_kwargs import Overrides, text_kwargs, vit_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "InternVLInputSpec", "internvl_config"]


def internvl_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return InternVLConfig(
        text_config=Qwen2Config(**{**text_kwargs(n, v), **text}),
        vision_config=InternVLVisionConfig(**{**vit_kwargs(16, 4), **vision}),
        **{
            "image_token_id": v.image,
            "image_seq_length": 4,
            "downsample_ratio": 0.5,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


class InternVLInputSpec(InputSpec):
    """``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``; each image is 1 tile
    or 3 tiles (2 crops + thumbnail), alternately."""

    tiles_cycle = (1, 3)

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size[0]
        side = vc.image_size[0] // vc.patch_size[0]
        out_side = int(side * config.downsample_ratio)
        self.per_tile = out_side * out_side

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        tiles = self.tiles_cycle[index % len(self.tiles_cycle)]
        ids = [self.vocab.start] + [self.vocab.image] * (self.per_tile * tiles) + [self.vocab.end]
        return MediaBlock("image", ids, {"pixels": random_pixels(gen, tiles, 3, self.size, self.size)})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        images = blocks_of_kind(rows, "image")
        return {"pixel_values": torch.cat([b.payload["pixels"] for b in images])} if images else {}


FAMILY = TinyFamily("internvl", internvl_config, InternVLForConditionalGeneration, InternVLInputSpec)
