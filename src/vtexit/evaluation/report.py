"""Rich tables for calibration and benchmark results (what the CLI and scripts print)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from vtexit.evaluation.bench import BenchRow
from vtexit.methods.vtw.calibrate import CalibrationResult


def kl_table(result: CalibrationResult) -> Table:
    """KL per candidate K with a bar, the chosen K marked."""
    table = Table(title=f"KL(full || withdrawn at K), mean over {result.num_rows} rows; eta = {result.eta:g}")
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
