"""VQA records -> one processor batch: the images opened, the prompts built, rows left-padded.

One place for it so that calibration batches, the evaluation runner and the analysis feed the model the same way.
Left padding is asked for in the call (``padding_side``), so the processor's tokenizer is not changed for good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from vtexit.evaluation.datasets import VQARecord


def processor_batch(processor, records: Sequence[VQARecord], prompt: Callable[[str], str]):
    """The processor's output (a ``BatchFeature`` of tensors) for ``records``, left-padded to the longest row."""
    if not records:
        raise ValueError("records is empty: a batch needs at least one record")
    images = [Image.open(r.image_path).convert("RGB") for r in records]
    return processor(
        images=images,
        text=[prompt(r.question) for r in records],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )


def processor_batches(
    processor, records: Sequence[VQARecord], prompt: Callable[[str], str], batch_size: int
) -> list[dict]:
    """``records`` in order, cut into batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        dict(processor_batch(processor, records[start : start + batch_size], prompt))
        for start in range(0, len(records), batch_size)
    ]
