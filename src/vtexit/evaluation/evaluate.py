"""Accuracy evaluation runner: dataset -> model (optionally under a vtexit method) -> answers -> exact match.

Besides accuracy (overall and per question type) it records, per sample, the wall time of ``generate``, the time
of the language model's prefill alone (the vision tower is a large share of end-to-end time on small models), and
the analytic FLOPs of the schedule that actually ran (read from the engine, so any method is counted right).

Configurations to be compared are timed interleaved (:func:`evaluate_interleaved`): batch by batch, each runs in
turn, in a rotating order, and times are medians of per-batch times. Timing one configuration after the other lets
a burst of load on a shared machine land on one side and pass for a speedup.

Inside :func:`vtexit.evaluation.distributed.data_parallel` (processes launched by torchrun or accelerate), each
process runs its share of the batches and every process returns the merged result.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.families import family_for
from vtexit.core.flops import DecoderShape, flops_per_row
from vtexit.core.handle import PatchHandle
from vtexit.evaluation import distributed
from vtexit.evaluation.batches import generate_cache_kwargs, processor_batch
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
    """Accuracy and cost of one configuration on a fixed list of questions.

    The two ``*_s_per_sample`` times are medians over batches of (batch time / rows in the batch);
    ``timed_batches`` is how many (fewer than :data:`vtexit.evaluation.report.MIN_TIMED` makes them noise-prone).
    """

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
    cache_implementation: str = "dynamic"  # generate's KV cache: "dynamic" (transformers' default) or "static"
    timed_batches: int | None = None  # batches the median times are over (None: not recorded)

    def to_dict(self) -> dict:
        return asdict(self)


def save_results(results: Sequence[EvalResult], path: str | Path) -> Path:
    """Write ``results`` as JSON; inside :func:`~vtexit.evaluation.distributed.data_parallel` only rank 0 writes
    (every rank holds the same merged results)."""
    path = Path(path)
    if not distributed.is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return path


def normalise_answer(text: str) -> str:
    """First word of a generation, lowercased: easy-vqa answers are one word."""
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    return words[0] if words else ""


@dataclass
class _Tally:
    """What one configuration has gathered so far."""

    answers: list[Answer] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)  # per batch, per sample
    lm_prefill_s: list[float] = field(default_factory=list)
    decode_flops: list[int] = field(default_factory=list)

    @classmethod
    def joined(cls, parts: Sequence[_Tally]) -> _Tally:
        """One tally of batch tallies, in the given (batch) order."""
        return cls(*([x for part in parts for x in getattr(part, f)] for f in cls.__dataclass_fields__))


def _check_methods(methods: Mapping[str, Method | None]) -> None:
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("methods must be a non-empty dict of name -> method (a callable patching the model) or None")
    for name, method in methods.items():
        if not isinstance(name, str) or not (method is None or callable(method)):
            raise ValueError(
                f"methods must map a name (str) to a method (a callable patching the model) or None, got "
                f"{name!r}: {method!r}"
            )


def _run_batch(model, parts, shape, tokenizer, inputs, chunk, method, generate_kwargs, tally: _Tally) -> None:
    handle = method(model) if method is not None else None
    try:
        with CallTimer(parts.language_model) as lm_timer:
            begin = time.perf_counter()
            out = model.generate(**inputs, do_sample=False, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            elapsed = time.perf_counter() - begin
        flops = flops_per_row(shape, handle.last_cost if handle is not None else None, inputs)
    finally:
        if handle is not None:
            handle.remove()
    tally.generate_s.append(elapsed / len(chunk))
    tally.lm_prefill_s.append(lm_timer.durations[0] / len(chunk))
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for record, text, cost in zip(chunk, texts, flops, strict=True):
        if cost.decode_per_token is not None:
            tally.decode_flops.append(cost.decode_per_token)
        prediction = normalise_answer(text)
        tally.answers.append(
            Answer(
                question=record.question,
                answer=record.answer,
                qtype=record.qtype,
                prediction=prediction,
                correct=prediction == record.answer.lower().strip(),
                prefill_flops=cost.prefill,
            )
        )


def _result(name: str, tally: _Tally, cache_implementation: str) -> EvalResult:
    answers = tally.answers
    by_type: dict[str, list[bool]] = defaultdict(list)
    for a in answers:
        by_type[a.qtype].append(a.correct)
    n = len(answers)
    return EvalResult(
        name=name,
        n=n,
        accuracy=sum(a.correct for a in answers) / n,
        per_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        count_per_type={k: len(v) for k, v in sorted(by_type.items())},
        generate_s_per_sample=statistics.median(tally.generate_s),
        lm_prefill_s_per_sample=statistics.median(tally.lm_prefill_s),
        prefill_flops_per_sample=sum(a.prefill_flops for a in answers) / n,
        decode_flops_per_token=sum(tally.decode_flops) / max(1, len(tally.decode_flops)),
        answers=answers,
        cache_implementation=cache_implementation,
        timed_batches=len(tally.generate_s),
    )


@torch.no_grad()
def evaluate_interleaved(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    methods: Mapping[str, Method | None],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    warmup_batches: int = 1,
    progress: bool = True,
    cache_implementation: str = "dynamic",
) -> list[EvalResult]:
    """Evaluate every configuration of ``methods`` (name -> method, None = unpatched) on the same batches.

    For each batch every configuration runs in turn, the order rotating from batch to batch, so that slow spells
    of a shared machine fall on all of them alike. Answers and FLOPs are those of separate runs; times are medians
    of per-batch times. First, every configuration runs the first ``warmup_batches`` batches untimed: the first
    calls of a process pay one-time costs (thread pools, allocator) that would otherwise land on whichever
    configuration comes first. ``cache_implementation`` is generate's KV cache: ``"dynamic"`` (transformers' default)
    or ``"static"`` (on a GPU transformers compiles its decode steps). Returns one result per configuration, in the
    order of ``methods``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(warmup_batches, bool) or not isinstance(warmup_batches, int) or warmup_batches < 0:
        raise ValueError(f"warmup_batches must be an integer >= 0, got {warmup_batches!r}")
    if not records:
        raise ValueError("records is empty")
    _check_methods(methods)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, **generate_cache_kwargs(cache_implementation))
    family = family_for(model)
    parts = family.resolve(model)
    shape = DecoderShape.from_model(model, family)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device  # inputs follow the model (each process's own GPU, if it has one)
    names = list(methods)
    starts = range(0, len(records), batch_size)
    ranks = distributed.active()  # inside data_parallel(): this process runs every world_size-th batch
    if ranks is not None:
        starts = starts[ranks.rank :: ranks.world_size]
    for start in starts[:warmup_batches]:
        chunk = records[start : start + batch_size]
        inputs = processor_batch(processor, chunk, prompt).to(device)
        for name in names:
            _run_batch(model, parts, shape, tokenizer, inputs, chunk, methods[name], generate_kwargs, _Tally())
    batches: dict[int, dict[str, _Tally]] = {}  # batch index -> configuration -> what it gave
    for start in tqdm(starts, desc=" vs ".join(names), disable=not progress or not distributed.is_main_process()):
        b = start // batch_size
        chunk = records[start : start + batch_size]
        inputs = processor_batch(processor, chunk, prompt).to(device)
        batches[b] = {name: _Tally() for name in names}
        shift = b % len(names)
        for name in names[shift:] + names[:shift]:
            _run_batch(model, parts, shape, tokenizer, inputs, chunk, methods[name], generate_kwargs, batches[b][name])
    batches = distributed.gather_union(batches)  # every process's batches (only this one's without data_parallel)
    order = sorted(batches)
    return [_result(name, _Tally.joined([batches[b][name] for b in order]), cache_implementation) for name in names]


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
    warmup_batches: int = 0,
    progress: bool = True,
    cache_implementation: str = "dynamic",
) -> EvalResult:
    """Answer every record greedily (batched, left-padded) and score exact match of the first word.

    For accuracy and FLOPs (no warm-up by default). To compare times of configurations use
    :func:`evaluate_interleaved`.
    """
    name = name or ("baseline" if method is None else "patched")
    return evaluate_interleaved(
        model,
        processor,
        records,
        prompt,
        {name: method},
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        warmup_batches=warmup_batches,
        progress=progress,
        cache_implementation=cache_implementation,
    )[0]
