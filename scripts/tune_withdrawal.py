"""Tune the default model to tolerate an early visual-token withdrawal (VTW), and save the LoRA adapter.

K is drawn per step uniformly from --layers; with probability --full a step runs without withdrawal.

    python scripts/tune_withdrawal.py --layers 3-10 --full 0.2 --steps 700 --lr 4e-4 --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vtexit.default_model.loader import TUNED_ADAPTER_FILE
from vtexit.training import LoraSettings, vtw_sampler
from vtexit.training.default_model import tune_default_model
from vtexit.training.sampler import parse_layer_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=parse_layer_spec, default="3-10", help="K range 'a-b' or list 'a,b,c'")
    p.add_argument("--full", type=float, default=0.2, help="share of steps without withdrawal (K = N)")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path("out/tune_withdrawal"))
    p.add_argument("--out", type=Path, default=TUNED_ADAPTER_FILE)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    tune_default_model(
        vtw_sampler(args.layers, full=args.full),
        steps=args.steps, out=args.out, lr=args.lr, seed=args.seed,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha), images=args.train_images, turns=args.turns,
        batch=args.batch, bf16=not args.fp32, work_dir=args.work_dir,
    )  # fmt: skip
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
