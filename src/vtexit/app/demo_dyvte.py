"""The DyVTE part of ``vtexit demo``: the shipped gates on the demo's test questions, against static VTW.

One more evaluation of the demo's fixed test questions (DyVTE with the gates shipped for the default model, at the
threshold saved with them); the table compares it with the demo's baseline and calibrated-K runs, the histograms
show where each question type exits, and the Pareto plot puts it on the demo's K sweep (read off the same runs).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch import nn

from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import EvalResult, evaluate
from vtexit.evaluation.exits import plot_pareto


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def run_dyvte_demo(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    baseline: EvalResult,
    vtw: EvalResult,
    vtw_layer: int,
    sweep: dict[int, tuple[float, float]],
    sweep_rows: int,
    out: Path,
    console: Console,
    *,
    batch_size: int = 8,
) -> EvalResult:
    """Evaluate DyVTE with the default gates on ``records``; print the comparison; write dyvte.json and
    pareto.png. ``sweep``: K -> (FLOPs saved, accuracy) of the demo's sweep on the first ``sweep_rows`` records."""
    from vtexit.default_model import load_default_gates
    from vtexit.methods.dyvte import dyvte

    gates = load_default_gates()
    handles = []

    def method(m):
        handles.append(dyvte(m, gates))
        return handles[-1]

    threshold = gates.config.threshold
    result = evaluate(
        model, processor, records, prompt, method=method, name=f"DyVTE (t={threshold:g})", batch_size=batch_size
    )
    exits = [k for h in handles for k in h.exit_layers]
    table = Table(title=f"DyVTE with the shipped gates vs static K ({baseline.n} fixed test questions)")
    for name in ("config", "accuracy", "per type", "FLOPs saved", "mean exit layer per type"):
        table.add_column(name, justify="right")
    n = gates.config.num_layers
    for run, layers in ((baseline, [n] * baseline.n), (vtw, [vtw_layer] * vtw.n), (result, exits)):
        saved = 1 - run.prefill_flops_per_sample / baseline.prefill_flops_per_sample
        per_type = " ".join(f"{t} {100 * v:.0f}%" for t, v in run.per_type.items())
        by_type = {
            t: _mean([k for k, a in zip(layers, run.answers, strict=True) if a.qtype == t]) for t in run.per_type
        }
        mean_exit = " ".join(f"{t} {v:.1f}" for t, v in by_type.items())
        table.add_row(run.name, f"{100 * run.accuracy:.1f}%", per_type, f"{100 * saved:.0f}%", mean_exit)
    console.print(table)
    histogram = Table(title="DyVTE exit layers per question type (questions per layer; N = never)")
    layers_seen = sorted(set(exits))
    histogram.add_column("type")
    for k in layers_seen:
        histogram.add_column(str(k) if k < n else f"{n} (N)", justify="right")
    for t in result.per_type:
        counts = Counter(k for k, a in zip(exits, result.answers, strict=True) if a.qtype == t)
        histogram.add_row(t, *(str(counts.get(k, "")) for k in layers_seen))
    console.print(histogram)

    head = result.answers[:sweep_rows]
    base_flops = _mean([a.prefill_flops for a in baseline.answers[:sweep_rows]])
    point = (1 - _mean([a.prefill_flops for a in head]) / base_flops, _mean([a.correct for a in head]))
    base_accuracy = _mean([a.correct for a in baseline.answers[:sweep_rows]])
    plot_pareto(
        sweep,
        {threshold: point},
        base_accuracy,
        out / "pareto.png",
        highlight=threshold,
        title=f"Accuracy against prefill FLOPs saved ({sweep_rows} questions)",
    )
    (out / "dyvte.json").write_text(
        json.dumps(
            {
                "gates": gates.source,
                "threshold": threshold,
                "exit_layers": exits,
                "result": {k: v for k, v in result.to_dict().items() if k != "answers"},
            },
            indent=1,
        )
    )
    console.print(f"wrote {out}/: dyvte.json, pareto.png")
    return result
