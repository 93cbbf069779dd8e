"""VTW on a LLaVA-1.5-shaped random model: measured prefill speedup vs the FLOPs ratio, decode time, KV bytes.

LM: hidden 1024, 16 layers (LLaVA-shaped, random weights); one image of 576 visual tokens + 64 text tokens,
batch 1. Runs are interleaved (baseline, K=4, K=8, K=12, then again) and medians are reported.

    python benchmarks/bench_vtw.py [--repeats 5] [--new-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.markup import escape

from vtexit.core.flops import FORMULA
from vtexit.evaluation.bench import bench_withdrawal
from vtexit.evaluation.report import bench_table
from vtexit.testing.tiny_models import build_llava_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="4,8,12")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)  # wide enough for the table when piped to a file
    case = build_llava_shaped(attn_implementation=args.attn)
    case.model.generation_config.eos_token_id = None
    inputs = case.inputs([1], text_len=args.text_tokens)
    prompt = inputs["input_ids"].shape[1]
    visual = int(case.media_mask(inputs).sum())
    console.print(
        f"LLaVA-shaped random model: {case.model.config.text_config.num_hidden_layers} layers, hidden "
        f"{case.model.config.text_config.hidden_size}; prompt {prompt} tokens ({visual} visual); "
        f"{args.threads} thread(s), {args.attn}, {args.repeats} interleaved repeats, {args.new_tokens} new tokens"
    )
    layers = [int(k) for k in args.layers.split(",")]
    rows = bench_withdrawal(case.model, inputs, layers, repeats=args.repeats, new_tokens=args.new_tokens)
    console.print(bench_table(rows))
    base = rows[0]
    for r in rows[1:]:
        speedup, ratio = base.lm_prefill_s / r.lm_prefill_s, base.prefill_flops / r.prefill_flops
        kv_share = 1 - r.kv_bytes_from(r.layer) / base.kv_bytes_from(r.layer)
        console.print(
            f"K={r.layer}: LM prefill speedup {speedup:.2f}x = {speedup / ratio:.2f} x FLOPs ratio "
            f"(target >= 0.90); LM decode {r.decode_token_s / base.decode_token_s:.2f} x baseline time per token; "
            f"KV of layers >= K {100 * kv_share:.1f}% smaller (visual share {100 * visual / prompt:.1f}%)"
        )
    console.print(f"[dim]FLOPs: {escape(FORMULA)}[/]")


if __name__ == "__main__":
    main()
