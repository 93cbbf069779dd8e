"""The default model against its withdrawal-tuned variant under VTW, on the same questions: KL curve, calibrated K
with its accuracy and FLOPs saved, accuracy against K, attention per token group. Writes JSON, a markdown table
and three figures.

    python scripts/compare_withdrawal_tuned.py --out out/compare_tuned
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vtexit.app.model_sources import load_source
from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.variants import (
    plot_accuracy_variants,
    plot_attention_variants,
    plot_kl_variants,
    report_variant,
)
from vtexit.methods.vtw.calibrate import DEFAULT_ETA

SWEEP = "1,2,3,4,5,6,8,10,12,16,20,24,28"


def table(reports) -> str:
    head = "| variant | calibrated K | accuracy unpatched | accuracy at calibrated K | prefill GFLOPs | FLOPs saved |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(
            f"| {r.name} | {r.calibration.layer} | {100 * r.unpatched.accuracy:.1f}% | "
            f"{100 * r.calibrated.accuracy:.1f}% | {r.calibrated.prefill_flops_per_sample / 1e9:.3f} | "
            f"{100 * r.flops_saved:.1f}% |"
        )
    points = [r.sweep_points() for r in reports]
    ks = sorted(set().union(*points))
    lines += ["", "| K | " + " | ".join(str(k) for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for r, p in zip(reports, points, strict=True):
        lines.append(f"| {r.name} | " + " | ".join(f"{100 * p[k][0]:.1f}%" if k in p else "" for k in ks) + " |")
    saved = {k: q[k][1] for q in points for k in q}  # the same questions, so the same FLOPs for both variants
    lines.append("| FLOPs saved | " + " | ".join(f"{100 * saved[k]:.0f}%" for k in ks) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="fixed easy-vqa test questions (seed --seed)")
    p.add_argument("--sweep-rows", type=int, default=200)
    p.add_argument("--sweep", default=SWEEP, help="K values of the accuracy sweep")
    p.add_argument("--calibration-rows", type=int, default=32, help="easy-vqa train questions (as vtexit demo)")
    p.add_argument("--attention-rows", type=int, default=8)
    p.add_argument("--eta", type=float, default=DEFAULT_ETA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/compare_tuned"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records = fixed_subset(EasyVQA("test"), args.rows, seed=args.seed)
    sweep = [int(k) for k in args.sweep.split(",")]
    reports, seconds = [], {}
    for spec, name in (("default", "default"), ("withdrawal-tuned", "withdrawal-tuned")):
        start = time.time()
        source = load_source(spec)
        batches = source.make_batches(args.calibration_rows, args.batch_size, "train", args.seed)
        report = report_variant(
            name, source.model, source.processor, source.prompt, batches, records, eta=args.eta,
            sweep_layers=sweep, sweep_rows=args.sweep_rows, attention_rows=args.attention_rows,
            batch_size=args.batch_size,
        )  # fmt: skip
        seconds[name] = round(time.time() - start, 1)
        reports.append(report)
        (args.out / f"{name}.json").write_text(json.dumps(report.summary(), indent=1))
        del source
    plot_kl_variants(reports, args.out / "kl_curves.png")
    plot_accuracy_variants(reports, args.out / "accuracy_vs_k.png")
    plot_attention_variants(reports, args.out / "attention_groups.png")
    text = table(reports)
    (args.out / "comparison.md").write_text(text + "\n")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds}
    (args.out / "run.json").write_text(json.dumps(meta, indent=1))
    print(text)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
