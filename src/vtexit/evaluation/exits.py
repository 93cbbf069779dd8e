"""Per-sample exits against static withdrawal: accuracy, prefill FLOPs saved, and where each question type exits.

Runs the unpatched model, VTW at several K and DyVTE at several thresholds on the same fixed questions (through
:func:`~vtexit.evaluation.evaluate.evaluate_interleaved`, so answers and FLOPs come from what ran), reads DyVTE's
exit layer for every row from its handles, and adds the *oracle* per-row exit on the VTW grid: for each question,
the smallest K whose answer is the unpatched model's. The oracle is the best any gate restricted to that grid could
do on these questions (it reads the answers, so it is a bound, not a method).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from torch import nn

from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import EvalResult, evaluate_interleaved
from vtexit.methods.dyvte import DyVTEGates, dyvte
from vtexit.methods.vtw import withdraw


@dataclass
class ExitRun:
    """One configuration on the fixed questions."""

    name: str
    kind: str  # "baseline" | "vtw" | "dyvte" | "oracle"
    setting: float | None  # K for VTW, the threshold for DyVTE
    accuracy: float
    per_type: dict[str, float]
    prefill_flops: float  # mean per question
    flops_saved: float  # share of the baseline's prefill FLOPs
    exit_layers: list[int] = field(default_factory=list, repr=False)  # per question (N = never)
    qtypes: list[str] = field(default_factory=list, repr=False)

    def mean_exit(self, qtype: str | None = None) -> float:
        layers = [k for k, t in zip(self.exit_layers, self.qtypes, strict=True) if qtype in (None, t)]
        return sum(layers) / len(layers)

    def histogram(self, qtype: str | None = None) -> dict[int, int]:
        """How many questions (of ``qtype``, or all) exited before each layer."""
        counts = Counter(k for k, t in zip(self.exit_layers, self.qtypes, strict=True) if qtype in (None, t))
        return dict(sorted(counts.items()))


def _per_type(correct: Sequence[bool], qtypes: Sequence[str]) -> dict[str, float]:
    out = {}
    for t in sorted(set(qtypes)):
        values = [c for c, q in zip(correct, qtypes, strict=True) if q == t]
        out[t] = sum(values) / len(values)
    return out


def _run(result: EvalResult, kind: str, setting, base_flops: float, exits: list[int]) -> ExitRun:
    return ExitRun(
        name=result.name,
        kind=kind,
        setting=setting,
        accuracy=result.accuracy,
        per_type=result.per_type,
        prefill_flops=result.prefill_flops_per_sample,
        flops_saved=1 - result.prefill_flops_per_sample / base_flops,
        exit_layers=exits,
        qtypes=[a.qtype for a in result.answers],
    )


def evaluate_exits(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    gates: DyVTEGates,
    layers: Sequence[int],
    thresholds: Sequence[float],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[ExitRun]:
    """Baseline, VTW at each of ``layers``, DyVTE with ``gates`` at each of ``thresholds``, and the oracle."""
    num_layers = gates.config.num_layers
    handles: dict[str, list] = {}

    def dyvte_at(threshold: float):
        def method(m):
            handle = dyvte(m, gates, threshold=threshold)
            handles[f"DyVTE t={threshold:g}"].append(handle)
            return handle

        return method

    methods = {"baseline": None}
    methods.update({f"VTW K={k}": (lambda m, k=k: withdraw(m, layer=k)) for k in layers})
    for threshold in thresholds:
        handles[f"DyVTE t={threshold:g}"] = []
        methods[f"DyVTE t={threshold:g}"] = dyvte_at(threshold)
    results = evaluate_interleaved(
        model, processor, records, prompt, methods, batch_size=batch_size, warmup_batches=0, progress=progress
    )
    base = results[0]
    runs = [_run(base, "baseline", None, base.prefill_flops_per_sample, [num_layers] * base.n)]
    vtw = dict(zip(layers, results[1 : 1 + len(layers)], strict=True))
    runs += [_run(r, "vtw", k, base.prefill_flops_per_sample, [k] * r.n) for k, r in vtw.items()]
    for threshold, result in zip(thresholds, results[1 + len(layers) :], strict=True):
        exits = [k for h in handles[result.name] for k in h.exit_layers]
        runs.append(_run(result, "dyvte", threshold, base.prefill_flops_per_sample, exits))
    runs.append(_oracle(base, vtw, num_layers))
    return runs


def _oracle(base: EvalResult, vtw: dict[int, EvalResult], num_layers: int) -> ExitRun:
    """Per question, the smallest K of the grid whose answer equals the unpatched model's."""
    exits, flops, correct = [], [], []
    for i, answer in enumerate(base.answers):
        layer = next((k for k in sorted(vtw) if vtw[k].answers[i].prediction == answer.prediction), None)
        chosen = vtw[layer].answers[i] if layer is not None else answer
        exits.append(layer if layer is not None else num_layers)
        flops.append(chosen.prefill_flops)
        correct.append(chosen.correct)
    qtypes = [a.qtype for a in base.answers]
    mean_flops = sum(flops) / len(flops)
    return ExitRun(
        name="oracle per-row K (bound)",
        kind="oracle",
        setting=None,
        accuracy=sum(correct) / len(correct),
        per_type=_per_type(correct, qtypes),
        prefill_flops=mean_flops,
        flops_saved=1 - mean_flops / base.prefill_flops_per_sample,
        exit_layers=exits,
        qtypes=qtypes,
    )


def markdown_table(runs: Sequence[ExitRun]) -> str:
    """One row per configuration: accuracy overall and per type, prefill GFLOPs, FLOPs saved, mean exit layer."""
    types = sorted(runs[0].per_type)
    lines = [
        "| config | accuracy | " + " | ".join(types) + " | prefill GFLOPs | FLOPs saved | mean exit layer |",
        "|---|---|" + "---|" * len(types) + "---|---|---|",
    ]
    for r in runs:
        cells = [f"{100 * r.per_type.get(t, float('nan')):.1f}%" for t in types]
        lines.append(
            f"| {r.name} | {100 * r.accuracy:.1f}% | " + " | ".join(cells) + f" | {r.prefill_flops / 1e9:.3f} | "
            f"{100 * r.flops_saved:.1f}% | {r.mean_exit():.1f} |"
        )
    return "\n".join(lines)


def histogram_table(runs: Sequence[ExitRun], num_layers: int) -> str:
    """Exit-layer histograms per question type for the per-row methods (DyVTE and the oracle)."""
    per_row = [r for r in runs if r.kind in ("dyvte", "oracle")]
    layers = sorted({k for r in per_row for k in r.exit_layers})
    header = "| config | type | mean | " + " | ".join(f"K={k}" if k < num_layers else "never" for k in layers) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(layers)]
    for r in per_row:
        for t in sorted(set(r.qtypes)):
            histogram = r.histogram(t)
            counts = " | ".join(str(histogram.get(k, "")) for k in layers)
            lines.append(f"| {r.name} | {t} | {r.mean_exit(t):.1f} | {counts} |")
    return "\n".join(lines)


Point = tuple[float, float]  # (share of prefill FLOPs saved, accuracy)


def pareto_points(runs: Sequence[ExitRun]) -> dict:
    """The points :func:`plot_pareto` draws, from evaluated runs."""
    point = lambda r: (r.flops_saved, r.accuracy)  # noqa: E731
    return {
        "vtw": {r.setting: point(r) for r in runs if r.kind == "vtw"},
        "dyvte": {r.setting: point(r) for r in runs if r.kind == "dyvte"},
        "baseline": next(r.accuracy for r in runs if r.kind == "baseline"),
        "oracle": next((point(r) for r in runs if r.kind == "oracle"), None),
    }


def plot_pareto(
    vtw: dict[int, Point],
    dyvte: dict[float, Point],
    baseline: float,
    path: str | Path,
    *,
    oracle: Point | None = None,
    target: Point | None = None,
    highlight: float | None = None,
    title: str = "Accuracy against prefill FLOPs saved: static K vs per-row exits",
) -> Path:
    """Accuracy against prefill FLOPs saved: VTW's curve over K, DyVTE's points per threshold, the unpatched model,
    the oracle per-row K, and (``target``: its lower-left corner) the region a method should reach. Only the end
    points of DyVTE's thresholds and the ``highlight`` one (the gates' own) are labelled: the rest lie too close."""
    fig = Figure(figsize=(7.2, 5.4))
    ax = fig.subplots()
    ks = sorted(vtw, key=lambda k: vtw[k][0])
    ax.plot([100 * vtw[k][0] for k in ks], [100 * vtw[k][1] for k in ks], marker="o", label="VTW (static K)")
    for k in ks:
        ax.annotate(
            f"{k}",
            (100 * vtw[k][0], 100 * vtw[k][1]),
            fontsize=7,
            xytext=(3, -9),
            textcoords="offset points",
            color="tab:blue",
        )
    ts = sorted(dyvte, key=lambda t: dyvte[t][0])
    if set(ts) != {highlight}:
        ax.plot(
            [100 * dyvte[t][0] for t in ts],
            [100 * dyvte[t][1] for t in ts],
            marker="D",
            linestyle="--",
            color="tab:red",
            label="DyVTE (gate threshold)",
        )
    for t in {ts[0], ts[-1]} - {highlight}:
        ax.annotate(
            f"t={t:g}",
            (100 * dyvte[t][0], 100 * dyvte[t][1]),
            fontsize=7,
            xytext=(-24, 6) if t == ts[0] else (4, -11),
            textcoords="offset points",
            color="tab:red",
        )
    if highlight in dyvte:
        saved, accuracy = dyvte[highlight]
        ax.plot(
            [100 * saved],
            [100 * accuracy],
            marker="D",
            markersize=10,
            color="tab:red",
            linestyle="",
            markeredgecolor="black",
            label=f"DyVTE, the gates' threshold t={highlight:g}",
        )
    ax.plot([0], [100 * baseline], marker="s", color="black", linestyle="", label="unpatched")
    if oracle is not None:
        ax.plot(
            [100 * oracle[0]],
            [100 * oracle[1]],
            marker="*",
            markersize=12,
            color="tab:green",
            linestyle="",
            label="oracle per-row K (bound)",
        )
    if target is not None:
        ax.fill_between(
            [100 * target[0], 100], 100 * target[1], 100, color="tab:red", alpha=0.08, label="target region"
        )
    ax.set_xlabel("prefill FLOPs saved (%)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def runs_to_json(runs: Sequence[ExitRun]) -> list[dict]:
    return [asdict(r) for r in runs]


def runs_from_json(data: list[dict]) -> list[ExitRun]:
    return [ExitRun(**d) for d in data]
