"""LLaVA-NeXT: Llama + CLIP with anyres tiling; tile and token counts depend on ``image_sizes``."""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PretrainedConfig,
)

from vtexit.testing.config_kwargs import TEXT_HEAD_DIM, VISION_HIDDEN, Overrides, text_kwargs, vit_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, blocks_of_kind, random_pixels
from vtexit.testing.vocab import Vocab

__all__ = ["FAMILY", "LlavaNextInputSpec", "anyres_layout", "llava_next_config"]


def llava_next_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    vc = CLIPVisionConfig(**{**vit_kwargs(8, 4), "projection_dim": VISION_HIDDEN, **vision})
    t = vc.image_size
    return LlavaNextConfig(
        text_config=LlamaConfig(**{**text_kwargs(n, v), "head_dim": TEXT_HEAD_DIM, **text}),
        vision_config=vc,
        **{
            "image_token_index": v.image,
            "image_grid_pinpoints": [[t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


def _best_resolution(size_hw: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """Pick the anyres canvas the LLaVA-NeXT processors pick: largest effective area, then least waste."""
    oh, ow = size_hw
    best: tuple[int, int] | None = None
    best_effective, best_waste = 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / ow, ph / oh)
        effective = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    assert best is not None
    return best


def anyres_layout(
    size_hw: tuple[int, int], pinpoints: list[list[int]], tile: int, side: int, max_tiles: int | None
) -> tuple[int, int]:
    """(tokens, tiles incl. the base tile) for one anyres image.

    Tokens = base tile + the tile grid unpadded back to the image's aspect ratio, with one newline
    token closing every feature row (OneVision also shrinks grids larger than `max_tiles` tiles).
    """
    bh, bw = _best_resolution(size_hw, pinpoints)
    grid_h, grid_w = math.ceil(bh / tile), math.ceil(bw / tile)
    cur_h, cur_w = grid_h * side, grid_w * side
    oh, ow = size_hw
    if ow / oh > cur_w / cur_h:
        new_h = int(round(oh * (cur_w / ow), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(ow * (cur_h / oh), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if max_tiles is not None:
        ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return side * side + cur_h * (cur_w + 1), grid_h * grid_w + 1


class LlavaNextInputSpec(InputSpec):
    """Anyres images: a base tile plus a tile grid; pixel tensors zero-padded to the most tiles."""

    max_tiles: int | None = None

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.tile = vc.image_size
        self.side = vc.image_size // vc.patch_size
        t = self.tile
        # Cycled over images so that one batch mixes wide, tall and square (unpadded) layouts.
        self.sizes: list[tuple[int, int]] = [(t, 2 * t), (2 * t, t), (t, t)]

    def _anyres(self, gen: torch.Generator, index: int) -> MediaBlock:
        size = self.sizes[index % len(self.sizes)]
        tokens, tiles = anyres_layout(size, self.config.image_grid_pinpoints, self.tile, self.side, self.max_tiles)
        pixels = random_pixels(gen, tiles, 3, self.tile, self.tile)
        return MediaBlock("image", [self.vocab.image] * tokens, {"pixels": pixels, "size": size})

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        return self._anyres(gen, index)

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        images = blocks_of_kind(rows, "image")
        if not images:
            return {}
        max_tiles = max(b.payload["pixels"].shape[0] for b in images)
        pixel_values = torch.zeros(len(images), max_tiles, 3, self.tile, self.tile)
        for i, b in enumerate(images):
            pixel_values[i, : b.payload["pixels"].shape[0]] = b.payload["pixels"]
        sizes = torch.tensor([b.payload["size"] for b in images], dtype=torch.long)
        return {"pixel_values": pixel_values, "image_sizes": sizes}


FAMILY = TinyFamily("llava_next", llava_next_config, LlavaNextForConditionalGeneration, LlavaNextInputSpec)
