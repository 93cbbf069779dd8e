"""bench_vllm's measurement loop: build an engine per configuration, time its rounds (TTFT batch, vLLM's own
first-token latencies, a full generate, the KV blocks the scheduler holds), alternate the configurations over the
cycles (CPU: all engines loaded once; GPU: one engine at a time), then count each row's KV blocks and prefill FLOPs."""

from __future__ import annotations

import gc
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_vllm_model import CPU_SHAPE, GPU_SHAPE, decoder_shape, make_images, write_model_folder

from vtexit.core.flops import FORMULA, DecoderShape, count, withdrawal_tokens

ARCH = "VtexitLlavaForConditionalGeneration"


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


def run(args, configs: dict, commit: str) -> tuple[list[Row], dict]:
    """Build the engines, time the cycles, fill each row's KV blocks and prefill FLOPs; ``configs``: name -> the
    plugin's method dict (None: vLLM's own LLaVA); ``commit``: the code measured, for the record."""
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as tmp:
        if args.model:
            folder, dummy = Path(args.model), args.dummy
        else:
            folder, dummy = write_model_folder(Path(tmp) / "model", shape), True
        lm = decoder_shape(folder)
        images = make_images(args.requests, args.image_size or shape.image_size)
        inputs = [{"prompt": args.prompt, "multi_modal_data": {"image": image}} for image in images]
        rows = [Row(name, configs[name]) for name in args.configs]
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
    account(rows, lm, args.requests, args.new_tokens)
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


def account(rows: list[Row], lm: DecoderShape, requests: int, new_tokens: int) -> None:
    """Each row's KV blocks per request (the peak the scheduler held, or the prompt's blocks) and the language
    model's prefill FLOPs per request (VTW: layers >= K on the text tokens only)."""
    for row in rows:
        if row.kv_peak_blocks:
            row.kv_blocks = max(row.kv_peak_blocks) / requests
            row.kv_source = "peak blocks held by the KV cache manager during the batch / requests"
        else:
            row.kv_blocks = math.ceil((row.prompt_tokens + new_tokens) / row.block_size)
            row.kv_source = "ceil((prompt tokens + new tokens) / block_size)"
        tokens = [row.prompt_tokens] * lm.num_layers
        if row.method and row.method.get("method") == "vtw":  # layers >= K run the text tokens only
            tokens = withdrawal_tokens(lm.num_layers, row.prompt_tokens, row.visual_tokens, row.method["layer"])
        row.flops_prefill = count(lm, tokens).prefill
