"""Host cost of the patch on a host-bound model: a tiny LLaVA on the CPU at batch 1, where every microsecond of
Python shows. Prints the prefill wall time unpatched vs patched at K = N (hooks, no compaction) and at K < N,
interleaved, medians, and the host-device syncs each adds (torch.profiler's aten::_local_scalar_dense).

    python benchmarks/bench_host_overhead.py [--repeats 200] [--layers 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import vtexit
from vtexit.evaluation.speed import time_call
from vtexit.testing.tiny_models import build_tiny


def syncs(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = build_tiny("llava", num_layers=args.layers)
    model, n = case.model, args.layers
    model.generation_config.eos_token_id = None
    inputs = case.inputs([1], text_len=[6])
    device = inputs["input_ids"].device
    configs = {"unpatched": None, f"K=N={n}": n, f"K={n // 2}": n // 2}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats + 10):
        for name, layer in configs.items():
            handle = vtexit.withdraw(model, layer=layer) if layer is not None else None
            seconds = time_call(lambda: model(**inputs), device)
            if handle is not None:
                handle.remove()
            if r >= 10:
                times[name].append(seconds)
    base = statistics.median(times["unpatched"])
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    print(f"tiny LLaVA, {n} layers, batch 1, 1 thread, {args.repeats} interleaved repeats (medians)")
    for name, layer in configs.items():
        median = statistics.median(times[name])
        handle = vtexit.withdraw(model, layer=layer) if layer is not None else None
        prefill_syncs = syncs(lambda: model(**inputs))
        generate_syncs = syncs(lambda: model.generate(**inputs, **generate))
        if handle is not None:
            handle.remove()
        print(
            f"{name:>10}: prefill {1e3 * median:.3f} ms ({median / base:.3f} x unpatched); host syncs: prefill "
            f"{prefill_syncs}, generate of 6 tokens {generate_syncs}"
        )


if __name__ == "__main__":
    main()
