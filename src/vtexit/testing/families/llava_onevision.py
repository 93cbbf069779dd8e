"""LLaVA-OneVision: Qwen2 + SigLIP; anyres (capped at 9 tiles) for single images, plus videos."""

from __future__ import annotations

import math

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from vtexit.testing.config_kwargs import Overrides, text_kwargs, vit_kwargs
from vtexit.testing.families.llava_next import LlavaNextInputSpec
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "LlavaOnevisionInputSpec", "llava_onevision_config"]


def llava_onevision_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    vc = SiglipVisionConfig(**{**vit_kwargs(12, 4), "vision_use_head": False, **vision})
    t = vc.image_size
    return LlavaOnevisionConfig(
        text_config=Qwen2Config(**{**text_kwargs(n, v), **text}),
        vision_config=vc,
        **{
            "image_token_index": v.image,
            "video_token_index": v.video,
            "image_grid_pinpoints": [[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "tie_word_embeddings": False,
            **top,
        },
    )


class LlavaOnevisionInputSpec(LlavaNextInputSpec):
    """Anyres only for single-image rows; multi-image rows get base tile + newline; videos are
    2x2-pooled per frame plus one trailing newline."""

    supports_video = True
    frames = 2

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        self.max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        t = self.tile
        # (t, 4t/3) exercises the unpadding of a padded tile grid.
        self.sizes = [(t, t + t // 3), (t, t), (2 * t, t)]

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        if images_in_row == 1:
            return self._anyres(gen, index)
        pixels = random_pixels(gen, 1, 3, self.tile, self.tile)
        size = (self.tile, self.tile)
        return MediaBlock("image", [self.vocab.image] * (self.side**2 + 1), {"pixels": pixels, "size": size})

    def video(self, gen: torch.Generator, index: int) -> MediaBlock:
        pooled = math.ceil(self.side / 2)
        tokens = self.frames * pooled * pooled + 1
        pixels = random_pixels(gen, self.frames, 3, self.tile, self.tile)
        return MediaBlock("video", [self.vocab.video] * tokens, {"pixels": pixels})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        out = super().collate(rows)
        if out:
            per_row = [sum(b.kind == "image" for b in row) for row in rows]
            out["batch_num_images"] = torch.tensor(per_row, dtype=torch.long)
        videos = blocks_of_kind(rows, "video")
        if videos:
            out["pixel_values_videos"] = torch.stack([b.payload["pixels"] for b in videos])
        return out


FAMILY = TinyFamily(
    "llava_onevision", llava_onevision_config, LlavaOnevisionForConditionalGeneration, LlavaOnevisionInputSpec
)
