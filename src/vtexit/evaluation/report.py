"""Rich tables for calibration, evaluation and benchmark results (what the CLI and scripts print)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from vtexit.evaluation.bench import BenchRow
from vtexit.evaluation.evaluate import EvalResult
from vtexit.methods.vtw.calibrate import CalibrationResult

# Removing work cannot make a configuration faster than its FLOPs ratio (up to noise); a measured speedup more than
# 10% above it says the timing was disturbed (e.g. a burst of load on a shared machine), not that VTW is that fast.
NOISE_TOLERANCE = 1.10
NOISE_MARK = "(noise?)"
NOISE_NOTE = (
    f"{NOISE_MARK}: more than {NOISE_TOLERANCE:.2f} x the FLOPs ratio, which bounds the speedup; "
    "timing noise, not a result. Repeat the run."
)


def beyond_flops_bound(speedup: float, flops_ratio: float, tolerance: float = NOISE_TOLERANCE) -> bool:
    """Whether a measured speedup exceeds what the FLOPs saved allow by more than the noise tolerance."""
    return speedup > tolerance * flops_ratio


def speedup_cell(speedup: float, flops_ratio: float, tolerance: float = NOISE_TOLERANCE) -> str:
    """``1.14x``, or ``2.80x (noise?)`` when the speedup is beyond the FLOPs bound."""
    text = f"{speedup:.2f}x"
    return f"{text} {NOISE_MARK}" if beyond_flops_bound(speedup, flops_ratio, tolerance) else text


RESULT_COLUMNS = (
    "config",
    "accuracy",
    "per type",
    "prefill GFLOPs",
    "FLOPs saved",
    "LM prefill ms",
    "generate ms/sample",
    "speedup (generate)",
    "speedup (LM prefill)",
)


def result_cells(name: str, r: EvalResult, baseline: EvalResult) -> list[str]:
    """The :data:`RESULT_COLUMNS` of one configuration against ``baseline``, speedups beyond the FLOPs bound flagged.

    The LM prefill speedup is bounded by the prefill FLOPs ratio; ``generate`` (vision tower, prefill, decode) by
    the larger of the prefill and decode-per-token FLOPs ratios.
    """
    prefill_ratio = baseline.prefill_flops_per_sample / r.prefill_flops_per_sample
    decode_ratio = baseline.decode_flops_per_token / r.decode_flops_per_token
    generate = baseline.generate_s_per_sample / r.generate_s_per_sample
    prefill = baseline.lm_prefill_s_per_sample / r.lm_prefill_s_per_sample
    return [
        name,
        f"{100 * r.accuracy:.1f}%",
        " ".join(f"{k} {100 * v:.0f}%" for k, v in r.per_type.items()),
        f"{r.prefill_flops_per_sample / 1e9:.3f}",
        f"{100 * (1 - r.prefill_flops_per_sample / baseline.prefill_flops_per_sample):.0f}%",
        f"{1e3 * r.lm_prefill_s_per_sample:.1f}",
        f"{1e3 * r.generate_s_per_sample:.1f}",
        speedup_cell(generate, max(prefill_ratio, decode_ratio)),
        speedup_cell(prefill, prefill_ratio),
    ]


def results_table(results: Sequence[EvalResult], baseline: EvalResult, dataset: str = "") -> Table:
    """Accuracy, FLOPs and median times against ``baseline``; speedups beyond the FLOPs bound flagged as noise."""
    where = f"{dataset}, " if dataset else ""
    cache = "" if baseline.cache_implementation == "dynamic" else f"; {baseline.cache_implementation} KV cache"
    table = Table(
        title=f"{where}{baseline.n} fixed questions (exact match; times: medians of interleaved batches{cache})"
    )
    for name in RESULT_COLUMNS:
        table.add_column(name, justify="right")
    flagged = False
    for r in results:
        cells = result_cells(r.name, r, baseline)
        flagged = flagged or any(NOISE_MARK in cell for cell in cells)
        table.add_row(*cells)
    if flagged:
        table.caption = NOISE_NOTE
    return table


def kl_table(result: CalibrationResult) -> Table:
    """KL per candidate K with a bar, the chosen K marked."""
    table = Table(
        title=f"KL(full || withdrawn at K), mean over {result.num_rows} rows with images; eta = {result.eta:g}"
    )
    table.add_column("K", justify="right")
    table.add_column("mean KL", justify="right")
    table.add_column("")
    top = max(result.kl.values()) or 1.0
    for k, value in sorted(result.kl.items()):
        bar = "█" * round(30 * value / top)
        mark = "  ← chosen" if k == result.layer else ""
        style = "bold green" if k == result.layer else None
        table.add_row(str(k), f"{value:.4f}", bar + mark, style=style)
    return table


def bench_table(rows: Sequence[BenchRow]) -> Table:
    """Measured prefill speedup next to the FLOPs ratio, decode time per token and KV-cache bytes."""
    base = next(r for r in rows if r.layer is None)
    table = Table(title="VTW benchmark (medians; ratios vs baseline in the same run)")
    for name in (
        "config",
        "prefill ms (model)",
        "LM prefill ms",
        "LM prefill speedup",
        "FLOPs ratio",
        "speedup / FLOPs",
        "LM decode ms/token",
        "generate ms",
        "KV MiB",
        "KV MiB layers>=K (base)",
    ):
        table.add_column(name, justify="right")
    for r in rows:
        speedup = base.lm_prefill_s / r.lm_prefill_s
        flops_ratio = base.prefill_flops / r.prefill_flops
        if r.layer is None:
            kv_later = "-"
        else:
            kv_later = f"{r.kv_bytes_from(r.layer) / 2**20:.2f} ({base.kv_bytes_from(r.layer) / 2**20:.2f})"
        table.add_row(
            r.label,
            f"{1e3 * r.prefill_s:.1f}",
            f"{1e3 * r.lm_prefill_s:.1f}",
            f"{speedup:.2f}x",
            f"{flops_ratio:.2f}x",
            f"{speedup / flops_ratio:.2f}",
            f"{1e3 * r.decode_token_s:.2f}",
            f"{1e3 * r.generate_s:.0f}",
            f"{r.kv_bytes / 2**20:.2f}",
            kv_later,
        )
    return table
