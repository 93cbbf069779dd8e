"""easy-vqa (4000 train / 1000 test 64x64 shape images, one-word answers) as a small record dataset.

Files are located through ``importlib.util.find_spec`` so nothing from the package is imported. easy-vqa's
questions json holds ``[question, answer, image_id]`` only, so the question type is derived from the answer:
shape (circle/rectangle/triangle), color (the 8 colours) or yes/no.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]
SHAPES = frozenset({"circle", "rectangle", "triangle"})
YES_NO = frozenset({"yes", "no"})
ANSWER_TYPES = ("shape", "color", "yes/no")


def data_dir() -> Path:
    """easy-vqa's ``data`` folder, found without importing the package."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("easy-vqa is not installed: pip install easy-vqa")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def answer_type(answer: str) -> str:
    """Question type from its answer: 'shape', 'color' or 'yes/no'."""
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


@dataclass(frozen=True)
class VQARecord:
    index: int  # position in the split's questions.json
    image_id: int
    image_path: Path
    question: str
    answer: str
    qtype: str


class EasyVQA:
    """The questions of one easy-vqa split, in file order; ``EasyVQA('test')[i]`` is stable across runs."""

    def __init__(self, split: Split = "train", root: Path | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.split = split
        self.root = (root or data_dir()) / split

    @cached_property
    def _rows(self) -> list[list]:
        with open(self.root / "questions.json") as f:
            return json.load(f)

    def image_path(self, image_id: int) -> Path:
        return self.root / "images" / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> VQARecord:
        question, answer, image_id = self._rows[index]
        return VQARecord(index, image_id, self.image_path(image_id), question, answer, answer_type(answer))

    def __iter__(self) -> Iterator[VQARecord]:
        return (self[i] for i in range(len(self)))

    def answers(self) -> list[str]:
        """The 13 possible answers."""
        return (self.root.parent / "answers.txt").read_text().split()
