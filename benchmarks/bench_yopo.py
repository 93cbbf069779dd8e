"""YOPO's strategies on a LLaVA-1.5-shaped random model: measured prefill speedup against the FLOPs ratio.

LM: hidden 1024, 16 layers, 16 heads (random weights) on the CPU, LLaVA-1.5-7B's LM shape in bf16 on CUDA. Prompts:
one image of 576 visual tokens (24 x 24) + 64 text tokens at batch 1; 2304 visual tokens (48 x 48), where the window
has more to save; on CUDA also batch 16 of the 576-token prompt. Each strategy alone and all four together are timed
interleaved with the model without vtexit in one run (one warm-up round, medians). Heads are calibrated on the prompt
itself with ``vtexit.calibrate_heads(keep=0.5)``. Each strategy runs as configured by default (``dense_below`` and
``window_kernel`` left at "auto"); on CUDA the split and dense executions and the window's two kernels are timed
beside it, so that a GPU run shows where the default threshold belongs.

Targets printed under each table (issue 20): at 576 visual tokens and batch 1 no default configuration is slower than
no YOPO; at 2304 and at batch 16 each reaches 0.8 of its FLOPs ratio; on the CPU 0.85 of it.

    python benchmarks/bench_yopo.py [--repeats 3] [--threads 1] [--high-res-tokens 2304]
    python benchmarks/bench_yopo.py --device cuda   # 576 x 1, 2304 x 1 and 576 x 16, LLaVA-1.5-7B's LM shape

Timing synchronises the device (CUDA events on a GPU).
"""

from __future__ import annotations

import argparse

import torch
from bench_speed import SHAPES, batch_inputs, build_model  # LLaVA-1.5-7B's language model, as for VTW
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import vtexit
from vtexit.core.flops import FORMULA
from vtexit.evaluation.speed import NOISE_MARGIN, MethodSpeed, measure_methods

TARGET_GPU, TARGET_CPU = 0.80, 0.85  # speedup / FLOPs ratio at 2304 and at batch 16 (CUDA); everywhere on the CPU
ALWAYS_DENSE = 10**9


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


def _configs(model, inputs, which: list[str], cuda: bool) -> dict[str, vtexit.YOPOConfig]:
    """Each strategy as configured by default; on CUDA also forced split, forced dense and the window's two kernels."""
    heads = vtexit.calibrate_heads(model, inputs, keep=0.5, progress=False)
    layers = model.config.text_config.num_hidden_layers
    drop = layers // 2
    every = {
        "window": ("window=5", dict(window=5)),
        "heads": (f"heads (keep {heads.fraction:.2f})", dict(heads=heads)),
        "layer_drop": (f"layer_drop={drop}", dict(layer_drop=drop)),
        "ffn_ratio": ("ffn_ratio=2", dict(ffn_ratio=2)),
        "all": ("all four", dict(window=5, heads=heads, layer_drop=drop, ffn_ratio=2)),
    }
    configs = {}
    for key in which:
        name, settings = every[key]
        configs[name] = vtexit.YOPOConfig(**settings)
        if cuda and key != "layer_drop":
            configs[f"{name} [split]"] = vtexit.YOPOConfig(**settings, dense_below=0)
            configs[f"{name} [dense]"] = vtexit.YOPOConfig(**settings, dense_below=ALWAYS_DENSE)
        if cuda and key == "window":
            configs[f"{name} [split, tiles]"] = vtexit.YOPOConfig(**settings, dense_below=0, window_kernel="tiles")
    return configs


def _targets(console: Console, rows: list[MethodSpeed], cuda: bool, batch1_576: bool) -> None:
    """The issue's targets for the default configurations (names without a bracketed variant)."""
    defaults = [r for r in rows[1:] if "[" not in r.name]
    if cuda and batch1_576:
        slower = [f"{r.name} {r.speedup:.2f}x" for r in defaults if r.speedup < 1.0]
        verdict = "met" if not slower else "NOT met: " + ", ".join(slower)
        console.print(f"target: no default configuration slower than no YOPO ({verdict})")
        return
    target = TARGET_GPU if cuda else TARGET_CPU
    short = [f"{r.name} {r.efficiency:.3f}" for r in defaults if r.efficiency < target]
    verdict = "met" if not short else "NOT met: " + ", ".join(short)
    console.print(f"target: every default configuration >= {target} of its FLOPs ratio ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--high-res-tokens", type=int, default=2304, help="0 skips the high-resolution prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="the batch of the 576-token prompt")
    parser.add_argument("--big-batch", type=int, default=16, help="on CUDA, a second batch of the 576-token prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = SHAPES["7b"] if cuda else {}  # on the CPU: hidden 1024, 16 layers (build_llava_shaped's defaults)
    dtype = torch.bfloat16 if cuda else torch.float32
    console = Console(width=160)
    every = ["window", "heads", "layer_drop", "ffn_ratio", "all"]
    runs = [(576, args.batch, every)]
    if args.high_res_tokens:
        runs.append((args.high_res_tokens, 1, every if cuda else ["window", "all"]))
    if cuda and args.big_batch > 1:
        runs.append((576, args.big_batch, every))
    for tokens, batch, which in runs:
        model, case = build_model(shape, tokens, device, dtype)
        inputs = batch_inputs(case, batch, device, dtype, text_len=args.text_tokens)
        configs = _configs(model, inputs, which, cuda)
        rows = measure_methods(model, inputs, configs, repeats=args.repeats)
        text = model.config.text_config
        where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} thread(s)"
        title = (
            f"{tokens} visual + {inputs['input_ids'].shape[1] - tokens} text tokens, batch {batch}, LLaVA-shaped "
            f"(hidden {text.hidden_size}, {text.num_hidden_layers} layers, {dtype}), {where}, "
            f"{args.repeats} interleaved repeats"
        )
        console.print(_table(title, rows))
        _targets(console, rows, cuda, batch1_576=(tokens, batch) == (576, 1))
        del model, case
        if cuda:
            torch.cuda.empty_cache()
    console.print(f"[dim]FLOPs: {escape(FORMULA)}[/]")


if __name__ == "__main__":
    main()
