"""Rich tables for calibration, evaluation and benchmark results (what the CLI and scripts print)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

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


# A median of n timings stands up to fewer than n/2 disturbed ones. From fewer than 5 timed batches (or repeats)
# one or two slow spells of a shared machine decide a time, and so a speedup: an 8-row sweep, one timed batch per
# point, once printed VTW at 0.10x and at 1.13x on a rerun. With 5, two disturbed batches still leave the median on
# an undisturbed one; such timings are printed with a warning, not refused (a quick look is still useful).
MIN_TIMED = 5


def few_timings_warning(count: int | None, unit: str, remedy: str) -> str | None:
    """The warning for times that are medians over only ``count`` timed ``unit``s (None: enough, or not known)."""
    if count is None or count >= MIN_TIMED:
        return None
    units = unit if count == 1 else ("batches" if unit == "batch" else f"{unit}s")
    return (
        f"warning: each configuration was timed on only {count} {units} (fewer than {MIN_TIMED}), so its times and "
        f"speedups are noise-prone: one slow spell of the machine can decide them. For steadier numbers {remedy}."
    )


FEW_BATCHES_REMEDY = (
    f"time {MIN_TIMED} or more batches: more --rows (batches = rows / --batch-size) or a smaller --batch-size"
)
FEW_REPEATS_REMEDY = f"use --repeats {MIN_TIMED} or more"


class FittedTable(Table):
    """A rich Table that shows every cell whole and fits the width it is printed at (the terminal's: nothing fixes a
    width). When the table is wider than that, the first column (the configurations' names, e.g.
    ``fastv:layer=2,keep=0.5``) keeps its longest name on one line if the other columns, narrowed to their longest
    words, leave room for it; the others share what is left. A name or cell that still does not fit folds over lines
    instead of being cut ("…" would make two specs, or two numbers, look alike)."""

    PADDING = 2  # the default padding: one space either side of a cell
    FIRST_FLOOR = 12  # the first column is never narrowed below this (or its longest name) by the others' needs

    def _fit(self, max_width: int) -> None:
        for column in self.columns:
            column.overflow, column.width = "fold", None
        texts = [[str(cell) for cell in (column.header, *column.cells)] for column in self.columns]
        whole = [max(map(len, cells), default=1) for cells in texts]
        words = [max((len(word) for cell in cells for word in cell.split()), default=1) for cells in texts]
        room = max_width - (len(self.columns) + 1) - self.PADDING * len(self.columns)  # minus borders and padding
        if sum(whole) <= room:
            return  # fits as it is
        first = min(whole[0], max(min(whole[0], self.FIRST_FLOOR), room - sum(words[1:])))
        left = room - first - sum(words[1:])
        self.columns[0].width = first
        if left < 0:
            return  # even the longest words do not fit: rich narrows the rest, cells fold
        wants = [w - m for w, m in zip(whole[1:], words[1:], strict=True)]
        total = sum(wants) or 1
        for column, least, want in zip(self.columns[1:], words[1:], wants, strict=True):
            column.width = least + min(want, left * want // total)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.columns:
            self._fit(options.max_width)
        return super().__rich_console__(console, options)


def _caption(notes: Sequence[tuple[str | None, str]]) -> Text | None:
    """The notes under a table, each on its own line in its style (a warning stands out); None if there are none."""
    shown = [(note, style) for note, style in notes if note]
    if not shown:
        return None
    return Text("\n").join(Text(note, style=style) for note, style in shown)


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


def result_rows_table(title: str, rows: Sequence[Sequence[str]], timed_batches: int | None = None) -> Table:
    """A table of :data:`RESULT_COLUMNS` rows (:func:`result_cells`): names whole, the noise footnote when a
    speedup is flagged, and a warning when the times are medians over fewer than :data:`MIN_TIMED` batches."""
    table = FittedTable(title=title, caption_justify="left")
    table.add_column(RESULT_COLUMNS[0])
    for name in RESULT_COLUMNS[1:]:
        table.add_column(name, justify="right")
    for cells in rows:
        table.add_row(*cells)
    flagged = any(NOISE_MARK in cell for cells in rows for cell in cells)
    warning = few_timings_warning(timed_batches, "batch", FEW_BATCHES_REMEDY)
    table.caption = _caption([(warning, "bold yellow"), (NOISE_NOTE if flagged else None, "")])
    return table


def results_table(results: Sequence[EvalResult], baseline: EvalResult, dataset: str = "") -> Table:
    """Accuracy, FLOPs and median times against ``baseline``; speedups beyond the FLOPs bound flagged as noise,
    times from fewer than :data:`MIN_TIMED` batches flagged as noise-prone."""
    where = f"{dataset}, " if dataset else ""
    cache = "" if baseline.cache_implementation == "dynamic" else f"; {baseline.cache_implementation} KV cache"
    title = f"{where}{baseline.n} fixed questions (exact match; times: medians of interleaved batches{cache})"
    rows = [result_cells(r.name, r, baseline) for r in results]
    return result_rows_table(title, rows, baseline.timed_batches)


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
    table = FittedTable(title="VTW benchmark (medians; ratios vs baseline in the same run)", caption_justify="left")
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
    table.caption = _caption([(few_timings_warning(base.repeats, "repeat", FEW_REPEATS_REMEDY), "bold yellow")])
    return table
