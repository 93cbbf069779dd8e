"""A user's own VQA set as JSON lines: one ``{"image": path, "question": ..., "answer": ...}`` per line.

Optional keys: ``"type"`` (question type for per-type accuracy; default "all"). Relative image paths are read
relative to the JSONL file. It yields the same records as :class:`~vtexit.evaluation.datasets.EasyVQA`,
so the evaluation runner and calibration take either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vtexit.evaluation.datasets.easy_vqa import VQARecord

REQUIRED_KEYS = ("image", "question", "answer")


class JsonlVQA:
    """Records of a JSONL file, in file order; errors name the line and the missing key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"dataset file {str(self.path)!r} does not exist")
        self._records = [self._parse(n, line) for n, line in enumerate(self._lines(), start=1)]
        if not self._records:
            raise ValueError(f"dataset file {str(self.path)!r} has no records")

    def _lines(self) -> list[str]:
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def _parse(self, number: int, line: str) -> VQARecord:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}:{number}: not valid JSON ({err.msg})") from None
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"{self.path}:{number}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}")
        image = Path(row["image"])
        if not image.is_absolute():
            image = self.path.parent / image
        if not image.is_file():
            raise ValueError(f"{self.path}:{number}: image {str(image)!r} does not exist")
        return VQARecord(
            index=number - 1,
            image_id=number - 1,
            image_path=image,
            question=str(row["question"]),
            answer=str(row["answer"]).strip().lower(),
            qtype=str(row.get("type", "all")),
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> VQARecord:
        return self._records[index]

    def __iter__(self) -> Iterator[VQARecord]:
        return iter(self._records)
