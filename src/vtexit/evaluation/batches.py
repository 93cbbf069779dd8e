"""VQA records -> one processor batch: the images opened, the prompts built, rows left-padded; and the KV cache
generate answers them with.

One place for it so that calibration batches, the evaluation runner, the analysis and the lmms-eval plugin feed the
model the same way. Left padding is asked for in the call (``padding_side``), so the processor's tokenizer is not
changed for good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from vtexit.evaluation.datasets import VQARecord

# generate's KV caches the runners offer: transformers' default, or its static cache (on a GPU transformers then
# compiles each decode step; vtexit sizes every layer's buffers to what it keeps).
CACHES = ("dynamic", "static")


def generate_cache_kwargs(cache_implementation: str) -> dict:
    """generate's keyword arguments for ``cache_implementation`` (one of ``CACHES``). ``"dynamic"`` passes nothing, so
    a model's own default cache is not overridden."""
    if cache_implementation not in CACHES:
        raise ValueError(f"cache_implementation must be one of {list(CACHES)}, got {cache_implementation!r}")
    return {} if cache_implementation == "dynamic" else {"cache_implementation": cache_implementation}


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
