"""Idefics3 / SmolVLM: Llama + SigLIP-style tower; images split into tagged crops plus a global crop."""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    PretrainedConfig,
)

from vtexit.testing.config_kwargs import TEXT_HEAD_DIM, Overrides, text_kwargs, vit_kwargs
from vtexit.testing.family import TinyFamily
from vtexit.testing.input_spec import InputSpec, MediaBlock, random_pixels
from vtexit.testing.vocab import PAD_ID, Vocab

__all__ = ["FAMILY", "Idefics3InputSpec", "idefics3_config"]


def idefics3_config(n: int, v: Vocab, text: Overrides, vision: Overrides, top: Overrides) -> PretrainedConfig:
    return Idefics3Config(
        text_config=LlamaConfig(**{**text_kwargs(n, v), "head_dim": TEXT_HEAD_DIM, **text}),
        vision_config=Idefics3VisionConfig(**{**vit_kwargs(16, 4), **vision}),
        **{"image_token_id": v.image, "scale_factor": 2, "pad_token_id": PAD_ID, "tie_word_embeddings": False, **top},
    )


class Idefics3InputSpec(InputSpec):
    """Every image is one global crop, optionally preceded by a grid of crops tagged
    ``<row_r_col_c>``; crops are wrapped in ``<fake_token_around_image>``; pixel tensors are per
    row, zero-padded to the row with the most crops, with a ``pixel_attention_mask``."""

    splits_cycle: tuple[tuple[int, int] | None, ...] = (None, (1, 2))

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size
        side = vc.image_size // vc.patch_size // config.scale_factor
        self.per_crop = side * side

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        v = self.vocab
        fake, global_img, newline = v.start, v.end, v.extra
        seq = [v.image] * self.per_crop
        split = self.splits_cycle[index % len(self.splits_cycle)]
        ids: list[int] = []
        crops = 1
        if split is not None:
            n_rows, n_cols = split
            for r in range(n_rows):
                for c in range(n_cols):
                    ids += [fake, v.tag(r * n_cols + c)] + seq
                ids.append(newline)
            ids.append(newline)
            crops += n_rows * n_cols
        ids += [fake, global_img] + seq + [fake]
        return MediaBlock("image", ids, {"pixels": random_pixels(gen, crops, 3, self.size, self.size)})

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        per_row = [[b.payload["pixels"] for b in row if b.kind == "image"] for row in rows]
        crops = [torch.cat(p) if p else torch.zeros(0, 3, self.size, self.size) for p in per_row]
        max_crops = max(c.shape[0] for c in crops)
        if max_crops == 0:
            return {}
        pixel_values = torch.zeros(len(rows), max_crops, 3, self.size, self.size)
        mask = torch.zeros(len(rows), max_crops, self.size, self.size, dtype=torch.bool)
        for b, c in enumerate(crops):
            pixel_values[b, : c.shape[0]] = c
            mask[b, : c.shape[0]] = True
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


FAMILY = TinyFamily("idefics3", idefics3_config, Idefics3ForConditionalGeneration, Idefics3InputSpec)
