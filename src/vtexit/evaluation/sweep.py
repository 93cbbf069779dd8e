"""Methods x budgets on one dataset: one table and one Pareto plot, so methods can be chosen side by side.

A sweep point is a method config as a dict (``{"method": "fastv", "layer": 2, "keep": 0.5}``), turned into the
method's config by :func:`vtexit.config_from_dict`: any registered method (DyVTE, later YOPO, a user's own) takes
part without changes here. ``{"method": "none"}`` is the unpatched model, the reference every point is compared
with; it is always run (first). An optional ``"label"`` key names a point in the table and plot.

Every point runs on the same questions through :func:`~vtexit.evaluation.evaluate.evaluate_interleaved`: batch by
batch, in rotating order, so slow spells of a shared machine fall on all points alike; times are medians. Prefill
FLOPs come from the cost records of what each layer ran.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import family_for
from vtexit.evaluation import distributed
from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import EvalResult, Method, evaluate_interleaved
from vtexit.evaluation.plots import ParetoPoint, plot_pareto
from vtexit.evaluation.report import RESULT_COLUMNS, result_cells, result_rows_table
from vtexit.methods.base import MethodConfig
from vtexit.methods.divprune.policy import DivPrunePolicy
from vtexit.methods.patch import apply
from vtexit.methods.registry import config_from_dict
from vtexit.methods.visionzip.config import VisionZipConfig
from vtexit.methods.vtw.config import valid_layer_range

BASELINE = {"method": "none"}
BASELINE_LABEL = "baseline"


def default_grid(model: nn.Module) -> list[dict[str, Any]]:
    """The built-in budgets for a model of N decoder layers (positions scale with N).

    VTW at K = N/2, 3N/4, 4N/5; FastV, the random drop and DART at layer 2 (FastV's and DART's K) keeping 1/2 and
    1/4; PyramidDrop with stages at N/4, N/2, 3N/4 (8/16/24 for 32 layers, as in its paper) keeping 1/2 and 1/4 per
    stage; before the language model, where the model allows it (see :func:`reduces_prompt`), DivPrune keeping 1/2
    and 1/4, VisionZip keeping 1/2 and 1/4 (a LLaVA-1.5 layout with a CLS tower) and 2 x 2 pooling of the visual grid.
    """
    low, n = valid_layer_range(model)
    last = n - 1

    def at(fraction: float) -> int:
        return min(max(low, int(n * fraction)), last)

    early = min(max(low, 2), last)
    stages = sorted({at(0.25), at(0.5), at(0.75)})
    grid: list[dict[str, Any]] = [dict(BASELINE)]
    grid += [{"method": "vtw", "layer": k} for k in sorted({at(0.5), at(0.75), at(0.8)})]
    grid += [{"method": "fastv", "layer": early, "keep": keep} for keep in (0.5, 0.25)]
    grid += [{"method": "pdrop", "layers": stages, "keep": keep} for keep in (0.5, 0.25)]
    grid += [{"method": "random_drop", "layer": early, "keep": keep, "seed": 0} for keep in (0.5, 0.25)]
    grid += [{"method": "dart", "layer": early, "keep": keep} for keep in (0.5, 0.25)]
    if reduces_prompt(model):
        grid += [{"method": "divprune", "keep": keep} for keep in (0.5, 0.25)]
        if zips_images(model):
            grid += [{"method": "visionzip", "keep": keep} for keep in (0.5, 0.25)]
        if family_for(model).visual_grid is not None:
            grid.append({"method": "pool", "stride": 2})  # a quarter of the visual tokens
    return grid


def reduces_prompt(model: nn.Module) -> bool:
    """Whether pre-LLM methods (DivPrune) can shorten this model's prompt (every built-in family can)."""
    try:
        ScheduleEngine(model, DivPrunePolicy(0.5)).check_policy()
    except ValueError:
        return False
    return True


def zips_images(model: nn.Module) -> bool:
    """Whether VisionZip can read this model's vision tower (every built-in family's)."""
    try:
        VisionZipConfig(keep=0.5).build_policy(model, family_for(model))
    except ValueError:
        return False
    return True


def _format(value: Any) -> str:
    if isinstance(value, dict) and "method" in value:  # a step of a hybrid
        return f"({label_of(config_from_dict(value))})"
    if isinstance(value, (tuple, list)):
        return "/".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def label_of(config: MethodConfig) -> str:
    """``fastv layer=2 keep=0.5``: the method and its settings, except on/off flags and unset (None) settings left
    at their default."""
    parts = [config.method]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (isinstance(f.default, bool) or f.default is None) and value == f.default:
            continue
        parts.append(f"{f.name}={_format(value)}")
    return " ".join(parts)


@dataclass(frozen=True)
class SweepEntry:
    """One point to run: its label and config (None: the unpatched model)."""

    label: str
    config: MethodConfig | None

    @property
    def method(self) -> str:
        return "none" if self.config is None else self.config.method

    def to_dict(self) -> dict[str, Any]:
        return dict(BASELINE) if self.config is None else self.config.to_dict()


def resolve_grid(model: nn.Module, grid: Sequence[Mapping[str, Any] | MethodConfig]) -> list[SweepEntry]:
    """Turn config dicts into entries and check every setting against ``model`` now, before any slow work
    (ValueError naming the point and the setting). The baseline comes first, once; labels must be unique."""
    family = family_for(model)
    entries = [SweepEntry(BASELINE_LABEL, None)]
    for i, item in enumerate(grid):
        if isinstance(item, MethodConfig):
            config, label = item, None
        elif isinstance(item, Mapping):
            data = dict(item)
            label = data.pop("label", None)
            try:
                config = config_from_dict(data)
            except (ValueError, TypeError) as err:  # TypeError: a config's constructor refusing its arguments
                raise ValueError(f"sweep point {i} {dict(item)}: {err}") from None
        else:
            raise ValueError(f"sweep point {i} must be a config dict such as {{'method': 'vtw', 'layer': 16}}")
        if config.method == "none":
            continue  # the baseline is always there, unpatched
        try:
            config.build_policy(model, family)  # the settings' checks against this model; nothing is attached
        except ValueError as err:
            raise ValueError(f"sweep point {i} ({config.to_dict()}): {err}") from None
        label = label_of(config) if label is None else str(label)
        entries.append(SweepEntry(label, config))
    labels = [e.label for e in entries]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"sweep points must be distinct; repeated: {duplicates}")
    return entries


@dataclass
class SweepPoint:
    """What one point gave: the evaluation result and the share of the baseline's prefill FLOPs it saved."""

    entry: SweepEntry
    result: EvalResult
    flops_saved: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.entry.label,
            "config": self.entry.to_dict(),
            "flops_saved": self.flops_saved,
            "result": self.result.to_dict(),
        }


def _method(config: MethodConfig) -> Method:
    return lambda model: apply(model, config)


def run_sweep(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    grid: Sequence[Mapping[str, Any] | MethodConfig] | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    warmup_batches: int = 1,
    progress: bool = True,
) -> list[SweepPoint]:
    """Evaluate every point of ``grid`` (default :func:`default_grid`) and the unpatched baseline, interleaved.

    Returns one point per entry, the baseline first."""
    entries = resolve_grid(model, default_grid(model) if grid is None else grid)
    methods = {e.label: (None if e.config is None else _method(e.config)) for e in entries}
    results = evaluate_interleaved(
        model,
        processor,
        records,
        prompt,
        methods,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        warmup_batches=warmup_batches,
        progress=progress,
    )
    base = results[0].prefill_flops_per_sample
    return [
        SweepPoint(entry, result, 1 - result.prefill_flops_per_sample / base)
        for entry, result in zip(entries, results, strict=True)
    ]


COLUMNS = RESULT_COLUMNS


def table_rows(points: Sequence[SweepPoint]) -> list[list[str]]:
    """One row of text cells per point (the :data:`COLUMNS`), against the first point (the baseline).

    Speedups beyond the FLOPs bound are flagged as noise (:func:`vtexit.evaluation.report.result_cells`)."""
    base = points[0].result
    return [result_cells(point.entry.label, point.result, base) for point in points]


def sweep_table(points: Sequence[SweepPoint], title: str) -> Table:
    """The sweep as a rich table (labels whole, fitting the terminal), with the noise footnote and, when the times
    come from fewer than :data:`~vtexit.evaluation.report.MIN_TIMED` batches, a warning."""
    title = f"{title} (exact match; times: medians of interleaved batches)"
    return result_rows_table(title, table_rows(points), points[0].result.timed_batches)


def markdown_table(points: Sequence[SweepPoint]) -> str:
    """The sweep table as Markdown (for a README or a report)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(points)]
    return "\n".join(lines) + "\n"


def pareto_points(points: Sequence[SweepPoint], measure: str = "flops") -> list[ParetoPoint]:
    """Points on the accuracy / cost plane; ``measure`` "flops" (prefill FLOPs saved) or "time" (the share of the
    baseline's measured LM prefill time saved, from the interleaved medians; negative when slower)."""
    if measure not in ("flops", "time"):
        raise ValueError(f"measure must be 'flops' or 'time', got {measure!r}")
    base = next(p for p in points if p.entry.config is None).result.lm_prefill_s_per_sample
    return [
        ParetoPoint(
            method=p.entry.method,
            label=p.entry.label,
            flops_saved=p.flops_saved if measure == "flops" else 1 - p.result.lm_prefill_s_per_sample / base,
            accuracy=p.result.accuracy,
        )
        for p in points
    ]


def save_sweep(points: Sequence[SweepPoint], folder: str | Path, title: str = "") -> dict[str, Path]:
    """Write ``sweep.json`` (every point with its config and answers), ``sweep.md``, ``pareto.png`` (accuracy
    against prefill FLOPs saved) and ``pareto_time.png`` (against measured LM prefill time saved). Under
    data-parallel evaluation (``torchrun -m vtexit.app.parallel sweep``) every rank holds the same merged points and
    only rank 0 writes."""
    folder = Path(folder)
    paths = {
        "json": folder / "sweep.json",
        "markdown": folder / "sweep.md",
        "plot": folder / "pareto.png",
        "time_plot": folder / "pareto_time.png",
    }
    if not distributed.is_main_process():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps([p.to_dict() for p in points], indent=1))
    paths["markdown"].write_text(markdown_table(points))
    plot_pareto(pareto_points(points), paths["plot"], title=title)
    plot_pareto(pareto_points(points, "time"), paths["time_plot"], title=title, saved="LM prefill time saved")
    return paths
