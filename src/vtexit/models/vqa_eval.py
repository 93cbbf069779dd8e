"""Exact-match evaluation of a LLaVA-style model on easy-vqa, the way the default model is scored.

Greedy decoding of a few tokens, then the first generated word (lowercased) against the one-word answer.
Batches are left-padded so that every row's last prompt token is in the last column, as ``generate`` expects.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vtexit.data.easy_vqa import EasyVQA, VQARecord
from vtexit.models.prompt import build_prompt, first_word

MAX_NEW_TOKENS = 4  # enough for every easy-vqa answer ("rect"+"angle") plus end-of-turn


def fixed_subset(split: str, size: int, seed: int = 0) -> list[VQARecord]:
    """A reproducible random subset of a split's questions (same seed -> same questions)."""
    data = EasyVQA(split)  # type: ignore[arg-type]
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return [data[i] for i in sorted(order[:size])]


@torch.no_grad()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    records: Sequence[VQARecord],
    batch_size: int = 16,
) -> list[str]:
    """The first generated word for each record's image and question."""
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    words: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = [Image.open(r.image_path).convert("RGB") for r in chunk]
            inputs = processor(
                images=images, text=[build_prompt(r.question) for r in chunk], return_tensors="pt", padding=True
            )
            out = model.generate(
                **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            words.extend(first_word(t) for t in texts)
    finally:
        tokenizer.padding_side = old_side
    return words


def score(records: Sequence[VQARecord], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy and count, overall and per question type."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, word in zip(records, predictions, strict=True):
        ok = word == record.answer.lower().strip()
        hits["overall"].append(ok)
        hits[record.qtype].append(ok)
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(hits.items())}
