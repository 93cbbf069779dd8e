"""Qwen2.5-VL: Qwen2-VL's layout with a windowed vision tower and per-video ``second_per_grid_ts``."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

from vtexit.testing.config_kwargs import (
    TEXT_HIDDEN,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_INTERMEDIATE,
    Overrides,
    text_kwargs,
)
from vtexit.testing.families.qwen2_vl import QwenVLInputSpec, mrope_parameters, qwen_top_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import MediaBlock
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "Qwen2_5_VLInputSpec", "qwen2_5_vl_config"]


def qwen2_5_vl_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(
            **{**text_kwargs(n, v), "rope_parameters": mrope_parameters([2, 3, 3]), **text}
        ),
        vision_config=Qwen2_5_VLVisionConfig(
            **{
                # two blocks: one windowed (2x2 merged tokens per window), one full attention
                "depth": 2,
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "num_heads": VISION_HEADS,
                "out_hidden_size": TEXT_HIDDEN,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 16,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,
                **vision,
            }
        ),
        **{**qwen_top_kwargs(v), **top},
    )


class Qwen2_5_VLInputSpec(QwenVLInputSpec):
    """Qwen2.5-VL additionally takes the seconds spanned by each temporal video patch."""

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        out = super().collate(rows)
        if "video_grid_thw" in out:
            out["second_per_grid_ts"] = torch.ones(out["video_grid_thw"].shape[0], dtype=torch.float32)
        return out


FAMILY = TinyFamily("qwen2_5_vl", qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLInputSpec)
