"""``vtexit train-gates``: label exits on a dataset with the model itself, fit DyVTE's gates, save them.

Labelling (record-and-replay) is the slow part; ``labels`` keeps its result in a file so that fitting can be
repeated with other settings in seconds. The gates folder gets ``training.json`` beside the weights: settings,
label statistics, the loss log, held-out accuracy per gate, simulated exits on held-out rows, and wall times.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vtexit.app.model_sources import ModelSource
from vtexit.methods.dyvte.gates import DyVTEGates
from vtexit.methods.dyvte.labels import ANSWER_KEY, ExitLabels, LabelRule
from vtexit.methods.dyvte.train import collect_labels, fit_gates, simulate_exits

ANSWERS = ("model", "dataset")
SIMULATED_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class TrainGatesSettings:
    dataset: str = "easy-vqa"
    rows: int = 1000
    batch_size: int = 16
    layers: list[int] | None = None
    answers: str = "model"
    gate_size: int | None = None
    steps: int = 400
    lr: float = 1e-3
    seed: int = 0
    min_agreement: float = 1.0
    loss_ratio: float = 1.03
    threshold: float = 0.5  # saved with the gates as their default exit threshold
    validation: float = 0.1
    max_new_tokens: int = 4
    labels: Path | None = None
    out: Path = Path("out/gates")


def _batches(source: ModelSource, settings: TrainGatesSettings) -> list[dict]:
    """Left-padded processor batches of the dataset's train questions (with answer ids when asked)."""
    if source.processor is None:  # the tiny random model: random prompts, its own answers
        return source.make_batches(settings.rows, settings.batch_size, "train", settings.seed)
    from vtexit.evaluation.batches import processor_batches
    from vtexit.evaluation.datasets.select import fixed_subset, load_dataset

    records = fixed_subset(load_dataset(settings.dataset, "train"), settings.rows, settings.seed)
    batches = processor_batches(source.processor, records, source.prompt, settings.batch_size)
    if settings.answers == "dataset":
        tokenizer = source.processor.tokenizer
        eos = source.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])[:1]
        for start, batch in zip(range(0, len(records), settings.batch_size), batches, strict=True):
            chunk = records[start : start + settings.batch_size]
            batch[ANSWER_KEY] = [
                torch.tensor(tokenizer(r.answer, add_special_tokens=False).input_ids + eos) for r in chunk
            ]
    return batches


def label_statistics(labels: ExitLabels) -> dict:
    """Share of rows safe at each layer and the histogram of the earliest safe layer (a perfect gate's exits)."""
    earliest = labels.earliest_safe().tolist()
    return {
        "rows": labels.rows,
        "safe_rate": {k: round(float(v), 4) for k, v in zip(labels.layers, labels.safe.float().mean(0), strict=True)},
        "earliest_safe_histogram": {k: earliest.count(k) for k in sorted(set(earliest))},
    }


def run_train_gates(source: ModelSource, settings: TrainGatesSettings, console: Console | None = None) -> DyVTEGates:
    console = console or Console()
    rule = LabelRule(settings.min_agreement, settings.loss_ratio)
    gates = DyVTEGates.for_model(source.model, layers=settings.layers, gate_size=settings.gate_size)
    begin = time.perf_counter()
    if settings.labels is not None and settings.labels.is_file():
        labels = ExitLabels.load(settings.labels)
        if tuple(labels.layers) != tuple(gates.layers):
            raise ValueError(
                f"labels file {str(settings.labels)!r} covers layers {list(labels.layers)}, not {list(gates.layers)}"
            )
        console.print(f"labels read from {settings.labels} ({labels.rows} rows)")
        labels = labels.with_rule(rule)
    else:
        labels = collect_labels(
            source.model, _batches(source, settings), gates.layers, rule=rule, max_new_tokens=settings.max_new_tokens
        )
        if settings.labels is not None:
            settings.labels.parent.mkdir(parents=True, exist_ok=True)
            labels.save(settings.labels)
    labelling = time.perf_counter() - begin
    record = fit_gates(
        gates, labels, steps=settings.steps, lr=settings.lr, seed=settings.seed, validation=settings.validation
    )
    record.rule = rule
    record.labelling_s = labelling
    record.fitting_s = time.perf_counter() - begin - labelling
    gates.training_record = record
    gates.set_default_threshold(settings.threshold)
    gates.save_pretrained(settings.out)

    held = torch.tensor(record.validation_rows_index, dtype=torch.long)
    simulated = {}
    if len(held):
        for threshold in sorted({*SIMULATED_THRESHOLDS, settings.threshold}):
            exits, kept = simulate_exits(gates, labels.select(held), threshold)
            simulated[threshold] = {
                "mean_exit": float(exits.float().mean()),
                "answers_kept": float(kept.float().mean()),
            }
    training = {**asdict(record), "rule": asdict(rule)}
    training.pop("validation_rows_index")
    info = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "model": source.name,
        "layers": list(gates.layers),
        "gate_size": gates.config.gate_size,
        "labels": label_statistics(labels),
        "training": training,
        "simulated_on_held_out_rows": simulated,
    }
    (settings.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    table = Table(title=f"gates: {labels.rows} labelled rows, {record.validation_rows} held out")
    for name in ("exit layer", "safe (train)", "held-out accuracy"):
        table.add_column(name, justify="right")
    for k in gates.layers:
        accuracy = record.validation_accuracy.get(k)
        table.add_row(
            str(k), f"{100 * record.safe_rate[k]:.0f}%", "-" if accuracy is None else f"{100 * accuracy:.0f}%"
        )
    console.print(table)
    for threshold, sim in simulated.items():
        console.print(
            f"threshold {threshold}: held-out rows exit at layer {sim['mean_exit']:.1f} on average, "
            f"{100 * sim['answers_kept']:.1f}% keep their answer"
        )
    console.print(
        f"labelling {labelling:.0f} s, fitting {record.fitting_s:.0f} s; wrote {settings.out}/ "
        f"({', '.join(sorted(p.name for p in settings.out.iterdir()))})"
    )
    return gates
