"""Qwen2-VL, and the input layout and config pieces that Qwen2.5-VL and Qwen3-VL build on."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from vtexit.testing.config_kwargs import TEXT_HEAD_DIM, TEXT_HIDDEN, VISION_HEADS, VISION_HIDDEN, Overrides, text_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "QwenVLInputSpec", "mrope_parameters", "qwen2_vl_config", "qwen_top_kwargs"]


def qwen_top_kwargs(v: Vocab) -> dict[str, Any]:
    """Top-level special ids shared by the Qwen VL configs."""
    return {
        "image_token_id": v.image,
        "video_token_id": v.video,
        "vision_start_token_id": v.start,
        "vision_end_token_id": v.end,
        "tie_word_embeddings": False,
    }


def mrope_parameters(section: list[int], **extra: Any) -> dict[str, Any]:
    # M-RoPE: the (temporal, height, width) sections split the head_dim/2 rotary frequencies.
    assert sum(section) == TEXT_HEAD_DIM // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


def qwen2_vl_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(**{**text_kwargs(n, v), "rope_parameters": mrope_parameters([2, 3, 3]), **text}),
        vision_config=Qwen2VLVisionConfig(
            **{
                "depth": 1,
                "embed_dim": VISION_HIDDEN,
                "hidden_size": TEXT_HIDDEN,  # merger output = LM width
                "mlp_ratio": 2,
                "num_heads": VISION_HEADS,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                **vision,
            }
        ),
        **{**qwen_top_kwargs(v), **top},
    )


class QwenVLInputSpec(InputSpec):
    """Qwen2-VL / 2.5-VL / 3-VL: flattened patches + ``(t, h, w)`` grids, ``<|vision_start|>`` /
    ``<|vision_end|>`` wrappers and ``mm_token_type_ids`` (needed for M-RoPE)."""

    supports_video = True

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        m = vc.spatial_merge_size
        self.merge = m
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        # Grids in patches (multiples of the merge size): 4, 6 and 12 tokens.
        self.grids: list[tuple[int, int, int]] = [(1, 2 * m, 2 * m), (1, 2 * m, 3 * m), (1, 3 * m, 4 * m)]
        self.video_grid = (2, 2 * m, 2 * m)

    def _tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge**2

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        grid = self.grids[index % len(self.grids)]
        ids = [self.vocab.start] + [self.vocab.image] * self._tokens(grid) + [self.vocab.end]
        pixels = random_pixels(gen, grid[0] * grid[1] * grid[2], self.patch_dim)
        return MediaBlock("image", ids, {"pixels": pixels, "grid": grid})

    def _video_ids(self, gen: torch.Generator, grid: tuple[int, int, int]) -> list[int]:
        return [self.vocab.start] + [self.vocab.video] * self._tokens(grid) + [self.vocab.end]

    def video(self, gen: torch.Generator, index: int) -> MediaBlock:
        grid = self.video_grid
        ids = self._video_ids(gen, grid)
        pixels = random_pixels(gen, grid[0] * grid[1] * grid[2], self.patch_dim)
        return MediaBlock("video", ids, {"pixels": pixels, "grid": grid})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for kind, pv_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            blocks = blocks_of_kind(rows, kind)
            if blocks:
                out[pv_key] = torch.cat([b.payload["pixels"] for b in blocks])
                out[grid_key] = torch.tensor([b.payload["grid"] for b in blocks], dtype=torch.long)
        return out

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        types = (input_ids == self.vocab.image).long() + 2 * (input_ids == self.vocab.video).long()
        return {"mm_token_type_ids": types}


FAMILY = TinyFamily("qwen2_vl", qwen2_vl_config, Qwen2VLForConditionalGeneration, QwenVLInputSpec)
