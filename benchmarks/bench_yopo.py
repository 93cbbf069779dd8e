"""YOPO's strategies on a LLaVA-1.5-shaped random model: measured prefill speedup against the FLOPs ratio.

LM: hidden 1024, 16 layers, 16 heads (random weights); one image of 576 visual tokens (24 x 24) + 64 text tokens,
batch 1; then a high-resolution prompt of 2304 visual tokens (48 x 48), where windowed attention has more to save.
Each strategy alone and all together are timed interleaved with the model without vtexit in one run (one warm-up
round, medians). Heads are calibrated on the prompt itself with ``vtexit.calibrate_heads(keep=0.5)``.

    python benchmarks/bench_yopo.py [--repeats 3] [--threads 1] [--high-res-tokens 2304]
    python benchmarks/bench_yopo.py --device cuda [--batch 1]   # LLaVA-1.5-7B's LM shape in bf16, built on the GPU

Timing synchronises the device (CUDA events on a GPU).
"""

from __future__ import annotations

import argparse

import torch
from bench_speed import SHAPES  # LLaVA-1.5-7B's language model, as the VTW GPU benchmark uses
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import vtexit
from vtexit.core.flops import FORMULA
from vtexit.evaluation.speed import NOISE_MARGIN, MethodSpeed, measure_methods
from vtexit.testing.tiny_models import build_llava_shaped

TARGET = 0.80  # the target: wall-clock speedup >= 0.8 x the FLOPs ratio


def _table(title: str, rows: list[MethodSpeed]) -> Table:
    table = Table(title=title)
    for column in ("config", "prefill ms", "speedup", "FLOPs ratio", "speedup / FLOPs ratio"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        flag = " (noise?)" if row.efficiency > NOISE_MARGIN else ""
        table.add_row(
            row.name,
            f"{1e3 * row.prefill_s:.0f}",
            f"{row.speedup:.2f}x",
            f"{row.flops_ratio:.2f}x",
            f"{row.efficiency:.2f}{flag}",
        )
    return table


def _configs(model, inputs, which: list[str]) -> dict[str, vtexit.YOPOConfig]:
    heads = vtexit.calibrate_heads(model, inputs, keep=0.5, progress=False)
    layers = model.config.text_config.num_hidden_layers
    drop = layers // 2
    every = {
        "window": ("window=5", vtexit.YOPOConfig(window=5)),
        "heads": (f"heads (keep {heads.fraction:.2f})", vtexit.YOPOConfig(heads=heads)),
        "layer_drop": (f"layer_drop={drop}", vtexit.YOPOConfig(layer_drop=drop)),
        "ffn_ratio": ("ffn_ratio=2", vtexit.YOPOConfig(ffn_ratio=2)),
        "all": ("all four", vtexit.YOPOConfig(window=5, heads=heads, layer_drop=drop, ffn_ratio=2)),
    }
    return dict(every[key] for key in which)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--high-res-tokens", type=int, default=2304, help="0 skips the high-resolution prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = SHAPES["7b"] if cuda else {}  # on the CPU: hidden 1024, 16 layers (build_llava_shaped's defaults)
    dtype = torch.bfloat16 if cuda else torch.float32
    console = Console(width=160)
    runs = [(576, ["window", "heads", "layer_drop", "ffn_ratio", "all"])]
    if args.high_res_tokens:
        runs.append((args.high_res_tokens, ["window", "all"]))
    for tokens, which in runs:
        with torch.device(device):
            case = build_llava_shaped(image_tokens=tokens, **shape)
        model = case.model.to(dtype).eval()
        inputs = {k: v.to(device) for k, v in case.inputs([1] * args.batch, text_len=args.text_tokens).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        configs = _configs(model, inputs, which)
        rows = measure_methods(model, inputs, configs, repeats=args.repeats)
        text = model.config.text_config
        where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} thread(s)"
        title = (
            f"{tokens} visual + {inputs['input_ids'].shape[1] - tokens} text tokens, batch {args.batch}, LLaVA-shaped "
            f"(hidden {text.hidden_size}, {text.num_hidden_layers} layers, {dtype}), {where}, "
            f"{args.repeats} interleaved repeats"
        )
        console.print(_table(title, rows))
        worst = min(rows[1:], key=lambda r: r.efficiency)
        console.print(f"lowest speedup / FLOPs ratio: {worst.efficiency:.2f} ({worst.name}); target >= {TARGET}")
    console.print(f"[dim]FLOPs: {escape(FORMULA)}[/]")


if __name__ == "__main__":
    main()
