"""Evaluate DyVTE against static VTW on the default model: the DyVTE table, histograms and plot of docs/results.md.

    python scripts/eval_dyvte.py [--gates FOLDER] [--rows 200] [--out out/dyvte]

Fixed easy-vqa test questions (``fixed_subset(EasyVQA("test"), rows, seed=0)``), greedy, 4 new tokens, batch 8.
Writes results.json, table.md (accuracy / FLOPs table and exit histograms per question type) and pareto.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vtexit.default_model import build_prompt, load_default, load_default_gates
from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.exits import (
    evaluate_exits,
    histogram_table,
    markdown_table,
    pareto_points,
    plot_pareto,
    runs_from_json,
    runs_to_json,
)
from vtexit.methods.dyvte import DyVTEGates

CALIBRATED_K = 24  # VTW's K from KL calibration on this model (docs/results.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gates", type=Path, default=None, help="gates folder (default: the shipped gates)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--layers", default="1,4,6,8,10,12,14,16,18,20,22,24,26,28,29")
    parser.add_argument("--thresholds", default="0.5,0.7,0.9,0.95,0.98,0.99")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/dyvte"))
    parser.add_argument("--replot", action="store_true", help="redraw table and plot from OUT/results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    gates = load_default_gates() if args.gates is None else DyVTEGates.from_pretrained(args.gates)
    if args.replot:
        runs = runs_from_json(json.loads((args.out / "results.json").read_text()))
    else:
        model, processor = load_default()
        records = fixed_subset(EasyVQA("test"), args.rows, seed=0)
        layers = [int(k) for k in args.layers.split(",")]
        thresholds = [float(t) for t in args.thresholds.split(",")]
        runs = evaluate_exits(
            model, processor, records, build_prompt, gates, layers, thresholds, batch_size=args.batch_size
        )
    base = runs[0]
    calibrated = next(r for r in runs if r.kind == "vtw" and r.setting == CALIBRATED_K)
    target_saved = 1 - 0.9 * (1 - calibrated.flops_saved)  # 10% fewer prefill FLOPs than VTW at K = 24
    points = pareto_points(runs)
    plot_pareto(
        points["vtw"],
        points["dyvte"],
        points["baseline"],
        args.out / "pareto.png",
        oracle=points["oracle"],
        target=(target_saved, base.accuracy - 0.01),
        highlight=gates.config.threshold,
    )
    num_layers = gates.config.num_layers
    text = (
        f"{args.rows} easy-vqa test questions (fixed_subset seed 0); gates: {gates.source}\n\n"
        + markdown_table(runs)
        + "\n\nExit layers per question type (count of questions per exit layer):\n\n"
        + histogram_table(runs, num_layers)
        + f"\n\ntarget: accuracy >= {100 * (base.accuracy - 0.01):.1f}% with >= {100 * target_saved:.1f}% of prefill "
        f"FLOPs saved (10% fewer than VTW K={CALIBRATED_K}, which saves {100 * calibrated.flops_saved:.1f}%)\n"
        + ("" if args.replot else f"wall time {time.perf_counter() - begin:.0f} s\n")
    )
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(runs_to_json(runs), indent=1))
    print(text)


if __name__ == "__main__":
    main()
