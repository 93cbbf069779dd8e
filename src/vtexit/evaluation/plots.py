"""Matplotlib figures of what withdrawal does, written as PNG files.

Figures are built with the object API (``matplotlib.figure.Figure``), not pyplot: no backend is selected and no
global figure state is touched, so importing this module changes nothing for a user's own plots, and saving a PNG
needs no screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ParetoPoint:
    """One configuration on the accuracy / cost plane; ``method`` picks the marker, ``label`` names the point."""

    method: str
    label: str
    flops_saved: float  # share of the baseline's cost saved, 0..1 (prefill FLOPs, or measured time)
    accuracy: float  # 0..1


MARKERS = {
    "none": "*",
    "vtw": "o",
    "fastv": "s",
    "pdrop": "^",
    "random_drop": "X",
    "dyvte": "D",
    "yopo": "P",
    "divprune": "h",
    "hybrid": "p",
    "dart": "v",
    "pool": "<",
    "visionzip": ">",
}
LABEL_ALL_UP_TO = 12  # a plot with more points labels its Pareto front only (the table names every point)
SPARE_MARKERS = ("8", "d", "H", "X", "P", "h")


def _beats(q: ParetoPoint, p: ParetoPoint) -> bool:
    """q is at least as good as p on both axes and better on one."""
    at_least = q.flops_saved >= p.flops_saved and q.accuracy >= p.accuracy
    return at_least and (q.flops_saved, q.accuracy) != (p.flops_saved, p.accuracy)


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point beats on both axes, ordered by FLOPs saved."""
    front = [p for p in points if not any(_beats(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.flops_saved, -p.accuracy))


# Label offsets (points) tried in turn, so that labels of nearby points do not overlap.
_LABEL_OFFSETS = ((6, 4), (6, -11), (-6, 4), (-6, -11), (6, 13), (-6, 13), (6, -20), (-6, -20))
_LABEL_FONT = 6.5


def _place_labels(fig: Figure, ax, items: list[tuple[float, float, str, str]]) -> None:
    """Annotate (x, y, text, colour) items, each at the first offset whose text box (estimated from the font
    size) overlaps no marker and no label placed before; the last offset when none is free."""
    fig.tight_layout()  # place against the final axes geometry
    scale = fig.dpi / 72
    placed: list[tuple[float, float, float, float]] = []
    for x, y, _, _ in items:  # markers are obstacles too
        px, py = ax.transData.transform((x, y))
        placed.append((px - 5 * scale, py - 5 * scale, px + 5 * scale, py + 5 * scale))
    for x, y, text, colour in items:
        px, py = ax.transData.transform((x, y))
        width, height = 0.6 * _LABEL_FONT * len(text) * scale, _LABEL_FONT * scale
        for dx, dy in _LABEL_OFFSETS:
            left = px + dx * scale - (width if dx < 0 else 0)
            bottom = py + dy * scale
            box = (left, bottom, left + width, bottom + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(dx, dy),
            ha="right" if dx < 0 else "left",
            fontsize=_LABEL_FONT,
            color=colour,
        )


def plot_pareto(
    points: Sequence[ParetoPoint], path: str | Path, title: str = "", saved: str = "prefill FLOPs saved"
) -> Path:
    """Accuracy against the share of cost saved (``saved`` names it: prefill FLOPs by default), one marker (and
    colour) per method, each point labelled with its settings (only those on the front when there are more than
    ``LABEL_ALL_UP_TO``), the Pareto front (points no other beats on both axes) as a dashed staircase."""
    fig = Figure(figsize=(8, 5.4))
    ax = fig.subplots()
    spare = iter(SPARE_MARKERS * 4)
    cycle = iter(f"C{i}" for i in range(100))
    labels = []
    front = pareto_front(points)
    labelled = front if len(points) > LABEL_ALL_UP_TO else points
    for method in dict.fromkeys(p.method for p in points):
        mine = [p for p in points if p.method == method]
        colour = "black" if method == "none" else next(cycle)
        marker = MARKERS.get(method) or next(spare)
        ax.scatter(
            [100 * p.flops_saved for p in mine],
            [100 * p.accuracy for p in mine],
            marker=marker,
            s=140 if marker == "*" else 60,
            color=colour,
            label="unpatched" if method == "none" else method,
            zorder=3,
        )
        for p in (p for p in mine if p in labelled):
            text = p.label.split(" ", 1)[1] if p.label.startswith(method + " ") else p.label
            if method == "hybrid":  # "pre=(divprune keep=0.5) then=(vtw layer=24)" -> "divprune keep=0.5 + vtw ..."
                text = text.removeprefix("pre=(").removesuffix(")").replace(") then=(", " + ")
            labels.append((100 * p.flops_saved, 100 * p.accuracy, text, colour))
    ax.step(
        [100 * p.flops_saved for p in front],
        [100 * p.accuracy for p in front],
        where="post",
        linestyle="--",
        color="grey",
        alpha=0.7,
        label="Pareto front",
        zorder=2,
    )
    lowest = min(100 * p.accuracy for p in points)
    ax.set_xlim(min(-3.0, min(100 * p.flops_saved for p in points) - 3), 103)  # time saved < 0: slower
    ax.set_ylim(max(0.0, 10 * (lowest // 10) - 10), 104)
    ax.set_xlabel(f"{saved} (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"Accuracy against {saved}")
    ax.legend(loc="lower left", fontsize=8)
    _place_labels(fig, ax, labels)
    return _save(fig, path)
