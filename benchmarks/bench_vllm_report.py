"""bench_vllm's table: each configuration against the baseline (the first row): FLOPs ratio, TTFT speedup (median of
the cycles' paired ratios, and best rounds), throughput, decode ms per step; printed as markdown with the run's
settings, and the records for ``--out``."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from bench_vllm_rounds import Row

from vtexit.core.flops import FORMULA
from vtexit.evaluation.report import NOISE_MARK, NOISE_TOLERANCE, beyond_flops_bound


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
