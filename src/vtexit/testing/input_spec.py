"""The interface a family implements to turn images/videos into token ids and pixel tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from vtexit.testing.vocab import Vocab

__all__ = ["InputSpec", "MediaBlock", "blocks_of_kind", "random_pixels"]


@dataclass
class MediaBlock:
    """One image or video as it appears in a row: its token ids plus what the collator needs."""

    kind: str  # "image" | "video"
    ids: list[int]
    payload: dict[str, Any]


def random_pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def blocks_of_kind(rows: list[list[MediaBlock]], kind: str) -> list[MediaBlock]:
    """All blocks of `kind` in batch order (row by row), as the collators stack them."""
    return [b for row in rows for b in row if b.kind == kind]


class InputSpec:
    """How one family turns images/videos into token ids and pixel tensors (its processor, minus text)."""

    supports_video = False

    def __init__(self, config: PretrainedConfig, vocab: Vocab) -> None:
        self.config = config
        self.vocab = vocab

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> MediaBlock:
        raise NotImplementedError

    def video(self, gen: torch.Generator, index: int) -> MediaBlock:
        raise ValueError("this family's tiny case does not take videos")

    def collate(self, rows: list[list[MediaBlock]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token tensors derived from the ids (e.g. ``mm_token_type_ids``)."""
        return {}
