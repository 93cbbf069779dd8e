"""Qwen3-VL: interleaved M-RoPE, deepstack visual features, and timestamped video frames."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

from vtexit.testing.config_kwargs import (
    TEXT_HEAD_DIM,
    TEXT_HIDDEN,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_INTERMEDIATE,
    Overrides,
    text_kwargs,
)
from vtexit.testing.families.qwen2_vl import QwenVLInputSpec, mrope_parameters, qwen_top_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "Qwen3VLInputSpec", "qwen3_vl_config"]


def qwen3_vl_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return Qwen3VLConfig(
        text_config=Qwen3VLTextConfig(
            **{
                **text_kwargs(n, v),
                "head_dim": TEXT_HEAD_DIM,
                "rope_parameters": mrope_parameters([4, 2, 2], mrope_interleaved=True),
                **text,
            }
        ),
        vision_config=Qwen3VLVisionConfig(
            **{
                "depth": 2,
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "num_heads": VISION_HEADS,
                "out_hidden_size": TEXT_HIDDEN,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 16,  # a 4x4 learned grid, interpolated per image
                # Deepstack: features of these vision blocks are added to the hidden states of the
                # visual tokens after decoder layers 0 and 1.
                "deepstack_visual_indexes": [0, 1],
                **vision,
            }
        ),
        **{**qwen_top_kwargs(v), **top},
    )


class Qwen3VLInputSpec(QwenVLInputSpec):
    """Qwen3-VL videos: each temporal patch is its own ``<t seconds><|vision_start|>...<|vision_end|>``
    group (the model's M-RoPE indexing expects text between frames)."""

    def _video_ids(self, gen: torch.Generator, grid: tuple[int, int, int]) -> list[int]:
        t, h, w = grid
        per_frame = self._tokens((1, h, w))
        lo, hi = self.vocab.text_range
        ids: list[int] = []
        for _ in range(t):
            timestamp = int(torch.randint(lo, hi, (1,), generator=gen))
            ids += [timestamp, self.vocab.start] + [self.vocab.video] * per_frame + [self.vocab.end]
        return ids


FAMILY = TinyFamily("qwen3_vl", qwen3_vl_config, Qwen3VLForConditionalGeneration, Qwen3VLInputSpec)
