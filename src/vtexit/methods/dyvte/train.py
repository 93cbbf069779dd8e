"""Training DyVTE's gates with the multimodal model frozen: label once (record-and-replay), then fit small MLPs.

Labelling is the expensive part (one recorded forward and a replay of the later layers per candidate layer, per
batch); fitting runs on the recorded features alone, so changing a training setting costs seconds, not forwards.
Each gate is trained with cross-entropy on its own layer's labels (classes weighted 1:1, as in the public code).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.methods.dyvte.gates import DyVTEGates
from vtexit.methods.dyvte.labels import DEFAULT_RULE, ExitLabels, LabelRule, label_batch


@dataclass
class GateTraining:
    """How a set of gates was trained: settings, label statistics, the loss log and wall time."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    rows: int
    validation_rows: int
    safe_rate: dict[int, float]  # per exit layer: share of training rows labelled safe
    loss_log: list[tuple[int, float]] = field(default_factory=list)  # (step, mean training loss over layers)
    validation_accuracy: dict[int, float] = field(default_factory=dict)  # per exit layer, held-out rows
    validation_rows_index: list[int] = field(default_factory=list, repr=False)  # which rows were held out
    rule: LabelRule | None = None  # how the labels were made (set by train_gates)
    labelling_s: float = 0.0
    fitting_s: float = 0.0


def _batches(samples: Mapping | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(samples, Mapping):
        return [samples]
    batches = list(samples)
    if not batches or not all(isinstance(b, Mapping) and "input_ids" in b for b in batches):
        raise ValueError("samples must be a processor output (a dict of tensors) or a non-empty iterable of them")
    return batches


@torch.no_grad()
def collect_labels(
    model: nn.Module,
    samples: Mapping | Iterable[Mapping],
    layers: Iterable[int],
    *,
    rule: LabelRule = DEFAULT_RULE,
    max_new_tokens: int = 4,
    family: FamilySpec | None = None,
    progress: bool = True,
) -> ExitLabels:
    """Gate features and exit labels for every row with visual tokens of ``samples``, at every layer of ``layers``."""
    if getattr(model, "_vtexit_engine", None) is not None:
        raise ValueError("training gates needs the unpatched model; remove the vtexit patch first")
    engine = ScheduleEngine(model, policy=None, family=family or family_for(model))
    layers = sorted(set(layers))
    parts = [
        label_batch(model, batch, layers, engine=engine, rule=rule, max_new_tokens=max_new_tokens)
        for batch in tqdm(_batches(samples), desc="labelling exits", unit="batch", disable=not progress)
    ]
    labels = ExitLabels.concat([p for p in parts if p.rows])
    if labels.rows == 0:
        raise ValueError("samples have no visual tokens: gates learn when withdrawing them is safe")
    return labels


def fit_gates(
    gates: DyVTEGates,
    labels: ExitLabels,
    *,
    steps: int = 400,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    validation: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> GateTraining:
    """Fit every gate of ``gates`` on its layer's features and labels; returns the training record.

    Runs on one CPU thread: the gates are small, and on a busy machine more threads only add waiting (measured:
    0.4 s on one thread against 30 s on two for the same fit while another process used both cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(gates, labels, steps, lr, weight_decay, batch_size, validation, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(gates, labels, steps, lr, weight_decay, batch_size, validation, seed, progress) -> GateTraining:
    if tuple(labels.layers) != tuple(gates.layers):
        raise ValueError(f"labels cover layers {list(labels.layers)}, gates {list(gates.layers)}")
    if not 0.0 <= validation < 1.0:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation!r}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(labels.rows, generator=generator)
    held = int(validation * labels.rows)
    train_rows, val_rows = order[held:], order[:held]
    x, y = labels.features.float(), labels.safe.long()
    gates = gates.float().train()
    with torch.no_grad():  # standardise each gate's input with statistics of its training features
        for j, k in enumerate(gates.layers):
            gate = gates.gates[str(k)]
            for linear in (gate.fc1, gate.fc2):
                nn.init.xavier_uniform_(linear.weight, generator=generator)
                nn.init.zeros_(linear.bias)
            features = x[train_rows, j]
            gate.shift.copy_(features.mean(dim=0))
            gate.scale.copy_(1.0 / (features.std(dim=0) + 1e-3 * features.std(dim=0).mean() + 1e-6))
    optimizer = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    )
    record = GateTraining(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        rows=len(train_rows),
        validation_rows=held,
        validation_rows_index=val_rows.tolist(),
        safe_rate={k: float(y[train_rows, j].float().mean()) for j, k in enumerate(gates.layers)},
    )
    bar = tqdm(range(steps), desc="fitting gates", unit="step", disable=not progress)
    for step in bar:
        pick = train_rows[torch.randint(len(train_rows), (min(batch_size, len(train_rows)),), generator=generator)]
        loss = torch.stack(
            [F.cross_entropy(gates(k, x[pick, j]), y[pick, j]) for j, k in enumerate(gates.layers)]
        ).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            record.loss_log.append((step, float(loss.detach())))
            bar.set_postfix(loss=f"{record.loss_log[-1][1]:.4f}")
    gates.eval().requires_grad_(False)
    if held:
        with torch.no_grad():
            for j, k in enumerate(gates.layers):
                predicted = gates(k, x[val_rows, j]).argmax(dim=-1)
                record.validation_accuracy[k] = float((predicted == y[val_rows, j]).float().mean())
    return record


def train_gates(
    model: nn.Module,
    samples: Mapping | Iterable[Mapping],
    *,
    layers: Iterable[int] | None = None,
    gate_size: int | None = None,
    steps: int = 400,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    min_agreement: float = 1.0,
    loss_ratio: float = 1.03,
    max_new_tokens: int = 4,
    family: FamilySpec | None = None,
    progress: bool = True,
) -> DyVTEGates:
    """Train DyVTE gates for ``model`` (frozen) on ``samples`` (left-padded processor outputs, or an iterable).

    Labels come from the model itself (:mod:`vtexit.methods.dyvte.labels`): exiting before layer K is safe for a
    row when its greedy answer (or the ``answer_ids`` a batch gives) keeps its top-1 on at least ``min_agreement``
    of the answer tokens and its loss stays <= ``loss_ratio`` x the full model's. ``layers``: the exit layers
    that get a gate (default: every layer the model accepts). The returned gates carry the training record in
    ``gates.training_record``.
    """
    rule = LabelRule(min_agreement=min_agreement, loss_ratio=loss_ratio)
    family = family or family_for(model)
    chosen = None if layers is None else list(layers)
    gates = DyVTEGates.for_model(model, layers=chosen, gate_size=gate_size, family=family)
    begin = time.perf_counter()
    labels = collect_labels(
        model, samples, gates.layers, rule=rule, max_new_tokens=max_new_tokens, family=family, progress=progress
    )
    labelling = time.perf_counter() - begin
    record = fit_gates(gates, labels, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    record.rule = rule
    record.labelling_s = labelling
    record.fitting_s = time.perf_counter() - begin - labelling
    gates.training_record = record
    return gates


@torch.no_grad()
def simulate_exits(gates: DyVTEGates, labels: ExitLabels, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What DyVTE would do on labelled rows, without running the model: (exit layer per row, whether the row's
    answer keeps its top-1 there). A row exits at the first gated layer whose gate passes ``threshold``; one that
    never exits keeps its answer. Used to choose settings on held-out training rows."""
    if tuple(labels.layers) != tuple(gates.layers):
        raise ValueError(f"labels cover layers {list(labels.layers)}, gates {list(gates.layers)}")
    gates = gates.float().eval()
    fires = torch.stack(
        [gates.exit_probability(k, labels.features[:, j].float()) > threshold for j, k in enumerate(gates.layers)],
        dim=1,
    )
    fires = torch.cat([fires, torch.ones(labels.rows, 1, dtype=torch.bool)], dim=1)
    first = fires.to(torch.int8).argmax(dim=1)
    layers = torch.tensor([*gates.layers, labels.num_layers])
    kept = torch.cat([labels.agreement >= 1.0 - 1e-6, torch.ones(labels.rows, 1, dtype=torch.bool)], dim=1)
    return layers[first], kept[torch.arange(labels.rows), first]
