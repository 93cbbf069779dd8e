"""Accuracy evaluation runner: dataset -> model (optionally under a vtexit method) -> answers -> exact match.

Besides accuracy (overall and per question type) it records, per sample, the wall time of ``generate``, the time
of the language model's prefill alone (the vision tower is a large share of end-to-end time on small models), and
the analytic FLOPs of the schedule that actually ran (read from the engine, so any method is counted right).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.families import family_for
from vtexit.core.flops import DecoderShape, count
from vtexit.core.handle import PatchHandle
from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.timing import CallTimer

Method = Callable[[nn.Module], PatchHandle]


@dataclass
class Answer:
    question: str
    answer: str
    qtype: str
    prediction: str
    correct: bool
    prefill_flops: int


@dataclass
class EvalResult:
    """Accuracy and cost of one configuration on a fixed list of questions."""

    name: str
    n: int
    accuracy: float
    per_type: dict[str, float]
    count_per_type: dict[str, int]
    generate_s_per_sample: float
    lm_prefill_s_per_sample: float
    prefill_flops_per_sample: float
    decode_flops_per_token: float
    answers: list[Answer] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def save_results(results: Sequence[EvalResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return path


def normalise_answer(text: str) -> str:
    """First word of a generation, lowercased: easy-vqa answers are one word."""
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    return words[0] if words else ""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    *,
    method: Method | None = None,
    name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    progress: bool = True,
) -> EvalResult:
    """Answer every record greedily (batched, left-padded) and score exact match of the first word."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("records is empty")
    family = family_for(model)
    parts = family.resolve(model)
    shape = DecoderShape.from_model(model, family)
    tokenizer = processor.tokenizer
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    handle = method(model) if method is not None else None
    answers: list[Answer] = []
    generate_s = lm_prefill_s = 0.0
    decode_flops: list[int] = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=name or "evaluate", disable=not progress):
            chunk = records[start : start + batch_size]
            images = [Image.open(r.image_path).convert("RGB") for r in chunk]
            inputs = processor(
                images=images, text=[prompt(r.question) for r in chunk], return_tensors="pt", padding=True
            )
            with CallTimer(parts.language_model) as lm_timer:
                begin = time.perf_counter()
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                generate_s += time.perf_counter() - begin
            lm_prefill_s += lm_timer.durations[0]
            if handle is not None:
                tokens = handle.engine.last_tokens_per_layer
            else:
                tokens = inputs["attention_mask"].sum(1).expand(shape.num_layers, -1)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for b, (record, text) in enumerate(zip(chunk, texts, strict=True)):
                flops = count(shape, tokens[:, b].tolist())
                decode_flops.append(flops.decode_per_token)
                prediction = normalise_answer(text)
                answers.append(
                    Answer(
                        question=record.question,
                        answer=record.answer,
                        qtype=record.qtype,
                        prediction=prediction,
                        correct=prediction == record.answer.lower().strip(),
                        prefill_flops=flops.prefill,
                    )
                )
    finally:
        tokenizer.padding_side = old_side
        if handle is not None:
            handle.remove()
    by_type: dict[str, list[bool]] = defaultdict(list)
    for a in answers:
        by_type[a.qtype].append(a.correct)
    n = len(answers)
    return EvalResult(
        name=name or ("baseline" if method is None else "patched"),
        n=n,
        accuracy=sum(a.correct for a in answers) / n,
        per_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        count_per_type={k: len(v) for k, v in sorted(by_type.items())},
        generate_s_per_sample=generate_s / n,
        lm_prefill_s_per_sample=lm_prefill_s / n,
        prefill_flops_per_sample=sum(a.prefill_flops for a in answers) / n,
        decode_flops_per_token=sum(decode_flops) / n,
        answers=answers,
    )
