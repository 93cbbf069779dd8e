"""Matplotlib figures of what withdrawal does, written as PNG files.

Figures are built with the object API (``matplotlib.figure.Figure``), not pyplot: no backend is selected and no
global figure state is touched, so importing this module changes nothing for a user's own plots, and saving a PNG
needs no screen.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from vtexit.methods.vtw.calibrate import CalibrationResult


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_kl(result: CalibrationResult, path: str | Path) -> Path:
    """KL(full || withdrawn) against K (information migration), eta and the chosen K marked."""
    ks = sorted(result.kl)
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(ks, [result.kl[k] for k in ks], marker="o", label="mean KL over calibration rows")
    ax.axhline(result.eta, color="tab:red", linestyle="--", label=f"eta = {result.eta:g}")
    ax.axvline(result.layer, color="tab:green", linestyle=":", label=f"chosen K = {result.layer}")
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel("KL(full || withdrawn), next token")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.5 * max(max(result.kl.values()), result.eta))
    ax.set_title(f"Information migration: KL against K ({result.num_rows} rows)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_accuracy_against_k(
    accuracy: dict[int, float],
    flops_saved: dict[int, float],
    baseline_accuracy: float,
    path: str | Path,
    chosen: int | None = None,
) -> Path:
    """Accuracy when withdrawing at K (left axis) and the share of prefill FLOPs saved (right axis)."""
    ks = sorted(accuracy)
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(ks, [accuracy[k] for k in ks], marker="o", color="tab:blue", label="accuracy with VTW at K")
    ax.axhline(baseline_accuracy, color="tab:blue", linestyle="--", alpha=0.6, label="unpatched model")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linestyle=":", label=f"calibrated K = {chosen}")
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel("exact-match accuracy", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(ks, [100 * flops_saved[k] for k in ks], marker="s", color="tab:orange", label="prefill FLOPs saved")
    right.set_ylabel("prefill FLOPs saved (%)", color="tab:orange")
    right.set_ylim(0, 100)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title("Accuracy and FLOPs saved against K")
    return _save(fig, path)


def plot_attention_groups(shares, groups: tuple[str, ...], path: str | Path) -> Path:
    """Stacked share of the last token's attention per token group, for every layer (attention sinks)."""
    layers = range(len(shares))
    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.subplots()
    bottom = [0.0] * len(shares)
    for g, name in enumerate(groups):
        values = [float(row[g]) for row in shares]
        ax.bar(layers, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of the last token's attention")
    ax.set_ylim(0, 1)
    ax.set_title("Where the last token attends, per layer (mean over heads and samples)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=len(groups), frameon=False)
    return _save(fig, path)
