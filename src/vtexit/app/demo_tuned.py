"""The withdrawal-tuned part of ``vtexit demo``: the default model tuned with VTW active, beside the default.

It loads ``load_default(variant="withdrawal-tuned")``, calibrates K on the demo's calibration questions, and
evaluates it unpatched and at its calibrated K (interleaved) on the demo's test questions; the table puts both
variants side by side, and ``kl_curves.png`` overlays their KL curves (where the visual information has migrated).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import EvalResult
from vtexit.evaluation.report import results_table
from vtexit.evaluation.variants import VariantReport, plot_kl_variants, report_variant
from vtexit.methods.vtw.calibrate import CalibrationResult


def comparison_table(reports: Sequence[VariantReport]) -> Table:
    """Per variant: calibrated K, accuracy unpatched and at that K, prefill FLOPs saved there."""
    n = reports[0].unpatched.n
    table = Table(title=f"default vs withdrawal-tuned under VTW ({n} fixed test questions; K calibrated per model)")
    for name in ("variant", "calibrated K", "accuracy unpatched", "accuracy at K", "prefill GFLOPs", "FLOPs saved"):
        table.add_column(name, justify="right")
    for r in reports:
        table.add_row(
            r.name,
            f"{r.calibration.layer} of {r.calibration.num_layers}",
            f"{100 * r.unpatched.accuracy:.1f}%",
            f"{100 * r.calibrated.accuracy:.1f}%",
            f"{r.calibrated.prefill_flops_per_sample / 1e9:.3f}",
            f"{100 * r.flops_saved:.0f}%",
        )
    return table


def run_tuned_demo(
    calibration: CalibrationResult,
    baseline: EvalResult,
    vtw: EvalResult,
    calibration_rows: int,
    records: Sequence[VQARecord],
    out: Path,
    console: Console,
    *,
    batch_size: int = 8,
    seed: int = 0,
) -> VariantReport:
    """Evaluate the withdrawal-tuned variant beside the default model's demo runs; write tuned.json, kl_curves.png."""
    from vtexit.app.model_sources import load_source

    start = time.perf_counter()
    with console.status("loading the withdrawal-tuned variant"):
        source = load_source("withdrawal-tuned")
    batches = source.make_batches(calibration_rows, batch_size, "train", seed)
    tuned = report_variant(
        "withdrawal-tuned", source.model, source.processor, source.prompt, batches, records,
        eta=calibration.eta, batch_size=batch_size,
    )  # fmt: skip
    default = VariantReport("default", calibration, baseline, vtw)
    console.print(results_table([tuned.unpatched, tuned.calibrated], tuned.unpatched, dataset="easy-vqa test"))
    console.print(comparison_table([default, tuned]))
    (out / "tuned.json").write_text(json.dumps({"default": default.summary(), "tuned": tuned.summary()}, indent=1))
    plot_kl_variants([default, tuned], out / "kl_curves.png")
    console.print(f"withdrawal-tuned part: {time.perf_counter() - start:.0f} s (load, calibration, two passes)")
    return tuned
