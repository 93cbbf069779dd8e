"""vLLM without the plugin beside vtexit's vLLM plugin at several budgets: prompt tokens, time to first token,
batch throughput, KV blocks and the FLOPs ratio of the language model's prefill.

CPU mode (default): a LLaVA-1.5-shaped model small enough for a CPU, random weights (``load_format="dummy"``, a
config-only folder): a CLIP tower at 336 px with 14 px patches (576 visual tokens per image; 2 layers, hidden 128)
and a Llama language model (hidden 576, 8 layers, 9 heads, 3 KV heads, gated MLP 1536), float32, the tiny word
vocabulary of ``vtexit.testing``. GPU mode (``--device cuda``): LLaVA-1.5-7B's shape (CLIP-L/336; Vicuna-7B: hidden
4096, 32 layers, 32 heads, FFN 11008, vocab 32000), float16, dummy weights; nothing is downloaded.

Each request is one image + a short question. Per configuration: TTFT is the wall time of a ``max_tokens=1``
generate of the whole batch (every request's first token), and, where vLLM's request metrics carry it, the median
of the requests' own first-token latencies (queueing included); throughput is output tokens/s of a generate of the
batch with ``--new-tokens`` tokens each (EOS ignored). KV blocks: the peak number of blocks the scheduler's KV cache
manager holds during that batch (read from its block pool after every scheduling step; the engine runs in this
process), divided by the requests; where the block pool is not reachable, ``ceil((prompt + new tokens) /
block_size)`` per request. Prefix caching is off, so that repeats recompute everything.

On the CPU all engines are loaded once and timed rounds alternate across them (``--repeats`` cycles, the order
reversed every other cycle); times are medians, and each ratio against the baseline is the median of the cycles' own
ratios. On a GPU one 7B engine fits at a time: each cycle builds, warms up, times and frees the configurations one
after another. A TTFT speedup above the FLOPs ratio by more than ``NOISE_TOLERANCE`` is flagged as noise.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--repeats 3] [--requests 8] [--new-tokens 16] [--out FILE]
    .venv-vllm/bin/python benchmarks/bench_vllm.py --device cuda        # needs a CUDA build of vLLM and a GPU
    .venv-vllm/bin/python benchmarks/bench_vllm.py --model DIR          # a LLaVA folder of your own (CLIP tower)

VTW rows (``vtw layer K``: the plugin's withdrawal inside the decoder, every visual token enters and leaves before
layer K) count the prefill FLOPs with layers >= K on the text tokens only; ``decode ms/step`` (every row) is a
round's generate time less its TTFT round, over the other ``new_tokens - 1`` steps. VTW runs on vLLM's CPU attention
backend only (the plugin refuses others), with ``enforce_eager`` (not with ``--cuda-graphs``).

A tower vLLM's own LLaVA refuses (the default model's DINOv2, which the plugin serves) takes the plugin unreduced as
its baseline, and its own prompt: ``--model DIR --configs "plugin none,divprune keep 0.25,pool stride 2" --prompt
"..."`` (not run yet).

The code: this file (command line, configurations), ``bench_vllm_model.py`` (the model folder, its language model's
shape, the images), ``bench_vllm_rounds.py`` (engines, timed rounds, cycles, KV blocks and FLOPs per row) and
``bench_vllm_report.py`` (ratios against the baseline, the table).
"""

from __future__ import annotations

import os

# What vLLM's CPU backend needs to run offline on a small machine; set before vLLM is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_vllm_report import print_table, table  # noqa: E402
from bench_vllm_rounds import run  # noqa: E402

PROMPT = "user : <image> what shape is in the image ? </s> assistant :"
# name -> the plugin's method dict (None: vLLM's own LLaVA, no plugin)
CONFIGS = {
    "no plugin": None,
    # the plugin serving the model unreduced: the baseline for towers vLLM's own LLaVA refuses (the default model's
    # DINOv2: --model DIR --configs "plugin none,divprune keep 0.25,pool stride 2")
    "plugin none": {"method": "none"},
    "divprune keep 0.5": {"method": "divprune", "keep": 0.5},
    "divprune keep 0.25": {"method": "divprune", "keep": 0.25},
    "divprune keep 0.11": {"method": "divprune", "keep": 0.11},
    "pool stride 2": {"method": "pool", "stride": 2},
    "pool stride 3": {"method": "pool", "stride": 3},
    # VTW in the decoder: every visual token enters, and leaves before layer K (the CPU shape has 8 layers, the 7B 32)
    "vtw layer 2": {"method": "vtw", "layer": 2},
    "vtw layer 4": {"method": "vtw", "layer": 4},
    "vtw layer 6": {"method": "vtw", "layer": 6},
    "vtw layer 16": {"method": "vtw", "layer": 16},
}
NOT_DEFAULT = ("plugin none", "vtw layer 6", "vtw layer 16")  # not in the default --configs (16: the 7B shape only)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--model", default=None, help="a LLaVA folder vLLM can load (CLIP tower); default: write a config-only folder"
    )
    parser.add_argument("--dummy", action="store_true", help="with --model: random weights (load_format='dummy')")
    parser.add_argument(
        "--configs",
        default=",".join(c for c in CONFIGS if c not in NOT_DEFAULT),
        help=f"comma-separated, the first is the baseline; of: {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--prompt", default=PROMPT, help="each request's prompt, with the model's image placeholder (for --model)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="the request images' size (px) before resizing")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one engine at a time, each cycle config by config (the GPU mode always does this)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="let vLLM compile and capture CUDA graphs (GPU; default: enforce_eager, as each cycle rebuilds engines)",
    )
    parser.add_argument("--out", default=None, help="write the rows and the run's settings as JSON")
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                "bench_vllm.py --device cuda needs a GPU and a CUDA build of vLLM; none is visible here "
                f"(torch {torch.__version__}). Run the CPU mode without --device, or run on a GPU machine."
            )
    rows, meta = run(args, CONFIGS, _commit())  # the commit at the start: the code measured
    head, lines, records = table(rows)
    print_table(head, lines, meta)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
