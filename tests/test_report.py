"""Result tables flag speedups the FLOPs cannot explain; plots leave matplotlib's global state alone."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from PIL import Image
from rich.console import Console

from vtexit.evaluation.evaluate import EvalResult
from vtexit.evaluation.report import beyond_flops_bound, results_table, speedup_cell


@pytest.mark.parametrize(
    ("speedup", "flops_ratio", "flagged"),
    [
        (2.80, 1.19, True),  # the demo run that started this: 16% of FLOPs saved, "2.80x faster"
        (1.14, 1.19, False),
        (1.30, 1.19, False),  # 1.30 < 1.10 * 1.19 = 1.309: within noise
        (1.32, 1.19, True),
        (0.90, 1.00, False),
    ],
)
def test_speedups_beyond_the_flops_bound_are_flagged_as_noise(speedup, flops_ratio, flagged):
    assert beyond_flops_bound(speedup, flops_ratio) is flagged
    assert speedup_cell(speedup, flops_ratio) == f"{speedup:.2f}x" + (" (noise?)" if flagged else "")


def _result(name: str, generate_s: float, prefill_s: float, prefill_flops: float, decode_flops: float) -> EvalResult:
    return EvalResult(
        name=name,
        n=200,
        accuracy=0.935,
        per_type={"shape": 0.97},
        count_per_type={"shape": 200},
        generate_s_per_sample=generate_s,
        lm_prefill_s_per_sample=prefill_s,
        prefill_flops_per_sample=prefill_flops,
        decode_flops_per_token=decode_flops,
    )


def _rows(table) -> list[str]:
    console = Console(record=True, width=300)
    console.print(table)
    return console.export_text().splitlines()


def test_results_table_marks_only_the_implausible_speedups():
    baseline = _result("baseline", 0.2800, 0.1179, 8.845e9, 2.0e8)
    burst = _result("VTW burst", 0.1000, 0.1037, 7.443e9, 1.9e8)  # generate 2.80x for a 1.19x FLOPs ratio
    honest = _result("VTW honest", 0.2500, 0.1037, 7.443e9, 1.9e8)  # 1.12x and 1.14x
    lines = _rows(results_table([baseline, burst, honest], baseline))
    burst_row = next(line for line in lines if "VTW burst" in line)
    honest_row = next(line for line in lines if "VTW honest" in line)
    assert "2.80x (noise?)" in burst_row and "1.14x" in burst_row and burst_row.count("(noise?)") == 1
    assert "(noise?)" not in honest_row and "1.12x" in honest_row
    assert any("timing noise, not a result" in line for line in lines)  # the footnote explains the mark
    calm = _rows(results_table([baseline, honest], baseline))
    assert not any("noise" in line for line in calm)


def test_results_table_says_when_the_answers_came_from_a_static_cache():
    dynamic = _result("baseline", 0.28, 0.12, 8.845e9, 2.0e8)
    static = dataclasses.replace(dynamic, cache_implementation="static")
    assert not any("KV cache" in line for line in _rows(results_table([dynamic], dynamic)))
    assert any("static KV cache" in line for line in _rows(results_table([static], static)))


def test_importing_plots_selects_no_backend_and_plots_use_no_pyplot_state(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
from vtexit.evaluation.plots import plot_kl
from vtexit.methods.vtw.calibrate import CalibrationResult
result = CalibrationResult(layer=2, eta=0.05, kl={{1: 0.8, 2: 0.01, 3: 0.0}}, num_rows=4, num_layers=3)
plot_kl(result, {str(tmp_path / "kl.png")!r})
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "0"]  # the user's backend kept, no figure left open in pyplot
    with Image.open(tmp_path / "kl.png") as image:
        assert image.format == "PNG" and image.size == (768, 480)  # figsize (6.4, 4) at 120 dpi


def _lines(table, width: int) -> list[str]:
    console = Console(record=True, width=width)
    console.print(table)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_result_tables_show_whole_method_specs_within_the_width(width):
    baseline = _result("baseline", 0.28, 0.12, 8.845e9, 2.0e8)
    names = ["fastv:layer=2,keep=0.25", "fastv:layer=2,keep=0.5", "pdrop:layers=8/16/24,keep=0.5"]
    results = [baseline, *(dataclasses.replace(baseline, name=name) for name in names)]
    lines = _lines(results_table(results, baseline), width)
    assert all(len(line) <= width for line in lines)
    first_cells = ["".join(re.split(r"[│┃]", line)[1].split()) for line in lines if line.startswith("│")]
    shown = "".join(first_cells)  # a long spec may fold over lines of its cell, never lose characters
    for name in names:
        assert name in shown and "…" not in shown, lines
    if width >= 120:  # room enough: each spec on one line
        assert all(any(name in line for line in lines) for name in names), lines


def test_timings_from_fewer_than_five_batches_are_flagged():
    baseline = _result("baseline", 0.28, 0.12, 8.845e9, 2.0e8)
    vtw = _result("VTW K=24", 0.25, 0.10, 7.4e9, 1.9e8)
    for batches, warned in [(1, True), (4, True), (5, False), (None, False)]:
        results = [dataclasses.replace(r, timed_batches=batches) for r in (baseline, vtw)]
        text = " ".join(" ".join(_lines(results_table(results, results[0]), 160)).split())
        assert ("noise-prone" in text and "--rows" in text) is warned, (batches, text)
        if warned:
            assert f"timed on only {batches} batch" in text


def test_bench_tables_flag_timings_from_fewer_than_five_repeats():
    from vtexit.evaluation.bench import BenchRow
    from vtexit.evaluation.report import bench_table

    def row(layer, repeats):
        return BenchRow(layer, 0.1, 0.08, 0.5, 0.01, (1024,) * 4, 1_000_000, 10_000, repeats=repeats)

    for repeats, warned in [(2, True), (5, False)]:
        text = " ".join(" ".join(_lines(bench_table([row(None, repeats), row(2, repeats)]), 160)).split())
        assert ("noise-prone" in text and "--repeats" in text) is warned, text
