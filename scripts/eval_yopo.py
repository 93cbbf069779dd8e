"""YOPO's strategies, training-free, on the default model, next to VTW and DyVTE: docs/results.md's YOPO table.

    python scripts/eval_yopo.py [--rows 200] [--out out/yopo]

Heads are calibrated (``vtexit.calibrate_heads``'s scores, one mask per keep) on 32 easy-vqa *train* questions
(``fixed_subset(EasyVQA("train"), 32, seed=0)``, the same calibration questions as the demo's K). Every point then
runs on the same fixed easy-vqa *test* questions (``fixed_subset(EasyVQA("test"), rows, seed=0)``) through
``run_sweep`` (interleaved, greedy, 4 new tokens, batch 8). Writes heads_keep*.json, sweep.json, sweep.md and
pareto.png to OUT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vtexit.default_model import build_prompt, load_default
from vtexit.evaluation.batches import processor_batches
from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.sweep import run_sweep, save_sweep
from vtexit.methods.yopo.heads import heads_from_scores, score_heads

CALIBRATED_K = 24  # VTW's K from KL calibration on this model (docs/results.md)
KEEPS = (0.75, 0.5, 0.25)


def grid(heads: dict[float, Path]) -> list[dict]:
    def yopo(label: str, **settings) -> dict:
        return {"method": "yopo", "label": label, **settings}

    h75, h50, h25 = (str(heads[k]) for k in KEEPS)
    return [
        {"method": "vtw", "layer": CALIBRATED_K, "label": f"VTW K={CALIBRATED_K}"},
        {"method": "dyvte", "label": "DyVTE (shipped gates)"},
        yopo("YOPO window=3", window=3),
        yopo("YOPO window=5", window=5),
        yopo("YOPO heads keep 0.75", heads=h75),
        yopo("YOPO heads keep 0.5", heads=h50),
        yopo("YOPO heads keep 0.25", heads=h25),
        yopo("YOPO heads keep 0.5, public zeroing", heads=h50, pruned_text="zero"),
        yopo("YOPO heads keep 0.25, public zeroing", heads=h25, pruned_text="zero"),
        yopo("YOPO ffn_ratio=2", ffn_ratio=2),
        yopo("YOPO ffn_ratio=4", ffn_ratio=4),
        yopo(f"YOPO layer_drop={CALIBRATED_K}", layer_drop=CALIBRATED_K),
        yopo("YOPO layer_drop=16", layer_drop=16),
        yopo("YOPO all: window=5, heads 0.5, ffn 2, drop 24", window=5, heads=h50, ffn_ratio=2, layer_drop=24),
        yopo("YOPO all: window=5, heads 0.75, ffn 2, drop 24", window=5, heads=h75, ffn_ratio=2, layer_drop=24),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/yopo"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    model, processor = load_default()
    calibration = fixed_subset(EasyVQA("train"), args.calibration_rows, seed=0)
    samples = processor_batches(processor, calibration, build_prompt, batch_size=8)
    scores = score_heads(model, samples)  # one pass; a mask per keep from the same scores
    heads = {}
    for keep in KEEPS:
        mask = heads_from_scores(scores, keep=keep)
        heads[keep] = args.out / f"heads_keep{keep}.json"
        mask.save(heads[keep])
        print(f"keep={keep}: {100 * mask.fraction:.0f}% of heads active for visual tokens")
    records = fixed_subset(EasyVQA("test"), args.rows, seed=0)
    points = run_sweep(model, processor, records, build_prompt, grid(heads), batch_size=8)
    title = f"default model, easy-vqa, {len(records)} questions"
    paths = save_sweep(points, args.out, title=title)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
