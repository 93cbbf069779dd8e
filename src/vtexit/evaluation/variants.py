"""Two models side by side under VTW (the default model and its withdrawal-tuned variant): the KL curve, the
calibrated K with its accuracy and FLOPs, accuracy against K and the attention per token group, on the same
questions, and figures that overlay them. Used by ``vtexit demo`` and ``scripts/compare_withdrawal_tuned.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vtexit.evaluation.analysis import GROUPS, accuracy_against_k, attention_by_group
from vtexit.evaluation.evaluate import EvalResult, evaluate_interleaved
from vtexit.evaluation.plots import _save
from vtexit.methods.vtw import withdraw
from vtexit.methods.vtw.calibrate import CalibrationResult, calibrate


@dataclass
class VariantReport:
    """What one model does under VTW on a fixed set of questions."""

    name: str
    calibration: CalibrationResult
    unpatched: EvalResult
    calibrated: EvalResult
    sweep: dict[int, EvalResult] = field(default_factory=dict)  # K -> VTW at K on the first sweep_rows questions
    sweep_rows: int = 0
    attention: np.ndarray | None = None

    @property
    def flops_saved(self) -> float:
        return 1 - self.calibrated.prefill_flops_per_sample / self.unpatched.prefill_flops_per_sample

    def sweep_points(self) -> dict[int, tuple[float, float]]:
        """K -> (accuracy, prefill FLOPs saved) on the sweep questions, the calibrated K and K = N included."""
        n = self.sweep_rows
        base = self.unpatched.answers[:n]
        base_flops = sum(a.prefill_flops for a in base) / n
        runs = {k: r.answers for k, r in self.sweep.items()}
        runs.setdefault(self.calibration.layer, self.calibrated.answers[:n])
        runs.setdefault(self.calibration.num_layers, base)
        return {
            k: (sum(a.correct for a in answers) / n, 1 - sum(a.prefill_flops for a in answers) / n / base_flops)
            for k, answers in sorted(runs.items())
        }

    def summary(self) -> dict:
        out = {
            "name": self.name,
            "calibrated_layer": self.calibration.layer,
            "eta": self.calibration.eta,
            "kl": {str(k): v for k, v in self.calibration.kl.items()},
            "unpatched_accuracy": self.unpatched.accuracy,
            "unpatched_per_type": self.unpatched.per_type,
            "calibrated_accuracy": self.calibrated.accuracy,
            "calibrated_per_type": self.calibrated.per_type,
            "prefill_flops_unpatched": self.unpatched.prefill_flops_per_sample,
            "prefill_flops_calibrated": self.calibrated.prefill_flops_per_sample,
            "flops_saved": self.flops_saved,
            "n": self.unpatched.n,
        }
        if self.sweep:
            out["sweep_rows"] = self.sweep_rows
            out["sweep"] = {str(k): {"accuracy": a, "flops_saved": s} for k, (a, s) in self.sweep_points().items()}
        if self.attention is not None:
            out["attention_groups"] = list(GROUPS)
            out["attention_share_per_layer"] = self.attention.round(5).tolist()
        return out


def report_variant(
    name: str,
    model,
    processor,
    prompt,
    calibration_batches,
    records: Sequence,
    *,
    eta: float,
    sweep_layers: Sequence[int] = (),
    sweep_rows: int = 0,
    attention_rows: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> VariantReport:
    """Calibrate K, evaluate unpatched and at the calibrated K (interleaved) on ``records``, then optionally VTW at
    each K of ``sweep_layers`` on the first ``sweep_rows`` records and the attention per group."""
    calibration = calibrate(model, calibration_batches, eta=eta)
    k = calibration.layer
    unpatched, calibrated = evaluate_interleaved(
        model, processor, records, prompt,
        {f"{name}: unpatched": None, f"{name}: VTW K={k} (calibrated)": lambda m: withdraw(m, layer=k)},
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    report = VariantReport(name, calibration, unpatched, calibrated, sweep_rows=sweep_rows)
    layers = [x for x in sweep_layers if x not in (k, calibration.num_layers)]
    if sweep_rows and layers:
        report.sweep = accuracy_against_k(
            model, processor, records[:sweep_rows], prompt, layers, batch_size=batch_size, progress=progress
        )
    if attention_rows:
        report.attention = attention_by_group(model, processor, records[:attention_rows], prompt, progress=progress)
    return report


COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


def plot_kl_variants(reports: Sequence[VariantReport], path: str | Path) -> Path:
    """The KL curves of the variants on one axis, eta and each calibrated K marked."""
    fig = Figure(figsize=(6.8, 4.2))
    ax = fig.subplots()
    top = 0.0
    for report, colour in zip(reports, COLOURS, strict=False):
        kl = report.calibration.kl
        ks = sorted(kl)
        ax.plot(ks, [kl[k] for k in ks], marker="o", markersize=3, color=colour, label=report.name)
        ax.axvline(report.calibration.layer, color=colour, linestyle=":", label=f"K = {report.calibration.layer}")
        top = max(top, *kl.values())
    eta = reports[0].calibration.eta
    ax.axhline(eta, color="black", linestyle="--", alpha=0.6, label=f"eta = {eta:g}")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.5 * max(top, eta))
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel("KL(full || withdrawn), next token")
    ax.set_title(f"KL against K ({reports[0].calibration.num_rows} calibration rows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_variants(reports: Sequence[VariantReport], path: str | Path) -> Path:
    """Accuracy with VTW at K for each variant (dashed: its unpatched accuracy), FLOPs saved on the right."""
    fig = Figure(figsize=(6.8, 4.2))
    ax = fig.subplots()
    right = ax.twinx()
    for report, colour in zip(reports, COLOURS, strict=False):
        points = report.sweep_points()
        ks = sorted(points)
        ax.plot(ks, [points[k][0] for k in ks], marker="o", markersize=3, color=colour, label=report.name)
        unpatched = points[report.calibration.num_layers][0]
        ax.axhline(unpatched, color=colour, linestyle="--", alpha=0.5)
        ax.axvline(report.calibration.layer, color=colour, linestyle=":", alpha=0.8)
        saved = [100 * points[k][1] for k in ks]
    right.plot(ks, saved, color="tab:orange", alpha=0.5, label="prefill FLOPs saved")
    right.set_ylabel("prefill FLOPs saved (%)", color="tab:orange")
    right.set_ylim(0, 100)
    ax.set_xlabel("withdrawal layer K (dotted: calibrated K; dashed: unpatched accuracy)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(f"Accuracy against K ({reports[0].sweep_rows} test questions)")
    return _save(fig, path)


def plot_attention_variants(reports: Sequence[VariantReport], path: str | Path) -> Path:
    """Per layer, the share of the last token's attention on each token group: one panel per variant."""
    fig = Figure(figsize=(7.2, 2.8 * len(reports) + 0.6))
    axes = fig.subplots(len(reports), 1, sharex=True, squeeze=False)[:, 0]
    for ax, report in zip(axes, reports, strict=True):
        shares = report.attention
        bottom = np.zeros(len(shares))
        for g, name in enumerate(GROUPS):
            ax.bar(range(len(shares)), shares[:, g], bottom=bottom, label=name)
            bottom += shares[:, g]
        ax.set_ylim(0, 1)
        ax.set_ylabel("attention share")
        ax.set_title(report.name, fontsize=10)
    axes[-1].set_xlabel("decoder layer")
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncol=len(GROUPS), frameon=False)
    return _save(fig, path)
