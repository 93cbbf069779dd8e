"""Pick a dataset by name or path, and a reproducible subset of it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

from vtexit.evaluation.datasets.easy_vqa import EasyVQA, VQARecord
from vtexit.evaluation.datasets.jsonl import JsonlVQA


class VQADataset(Protocol):
    """What the evaluation runner needs: indexable records with an image, a question and an answer."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> VQARecord: ...


def load_dataset(spec: str, split: str = "test") -> VQADataset:
    """``easy-vqa`` (its ``split``) or a path to a JSONL file of image/question/answer records."""
    if spec == "easy-vqa":
        return EasyVQA(split)  # type: ignore[arg-type]
    if Path(spec).suffix == ".jsonl":
        return JsonlVQA(spec)
    raise ValueError(f"dataset must be 'easy-vqa' or a .jsonl file of image/question/answer records, got {spec!r}")


def fixed_subset(dataset: VQADataset, size: int, seed: int = 0) -> list[VQARecord]:
    """``size`` records chosen by ``seed`` (same seed, same records), in dataset order."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    return [dataset[i] for i in sorted(order[:size])]
