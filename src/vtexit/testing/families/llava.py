"""LLaVA-1.5: Llama + CLIP; ``<image>`` expands to one token per CLIP patch, no wrapper tokens."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PretrainedConfig

from vtexit.testing.config_kwargs import TEXT_HEAD_DIM, VISION_HIDDEN, Overrides, text_kwargs, vit_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "LlavaInputSpec", "llava_config"]


def llava_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return LlavaConfig(
        text_config=LlamaConfig(**{**text_kwargs(n, v), "head_dim": TEXT_HEAD_DIM, **text}),
        vision_config=CLIPVisionConfig(**{**vit_kwargs(16, 4), "projection_dim": VISION_HIDDEN, **vision}),
        **{
            "image_token_index": v.image,
            "image_seq_length": 16,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


class LlavaInputSpec(InputSpec):
    """One ``<image>`` token per CLIP patch (plus CLS unless the "default" strategy drops it)."""

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size
        side = vc.image_size // vc.patch_size
        # CLIP prepends a CLS token; the "default" strategy drops it.
        self.tokens = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        pixels = random_pixels(gen, 3, self.size, self.size)
        return MediaBlock("image", [self.vocab.image] * self.tokens, {"pixels": pixels})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        images = blocks_of_kind(rows, "image")
        return {"pixel_values": torch.stack([b.payload["pixels"] for b in images])} if images else {}


FAMILY = TinyFamily("llava", llava_config, LlavaForConditionalGeneration, LlavaInputSpec)
