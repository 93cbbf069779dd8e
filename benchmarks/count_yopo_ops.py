"""YOPO's host work per prefill, counted (not timed) on a proxy where compute is negligible: a LLaVA-shaped model with
hidden 64 and 8 layers, 576 visual + 64 text tokens, batch 1, on the CPU. A batch-1 prefill of a 7B model on a GPU is
host-bound, so what each strategy adds there is about its operators. Per configuration, split and dense, beside the
unpatched model: the top-level aten operators of one prefill (each a dispatch from Python, most a kernel on a GPU),
the `where` operators at every level (SDPA's conversion of a boolean mask shows here) and the host syncs the profiler
records (the split path's row blocks read their widths with ``tolist``, which it does not record: one sync more than
shown). The counts do not depend on the machine's load.

    python benchmarks/count_yopo_ops.py [--layers 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

import vtexit
from vtexit.evaluation.device_profile import is_top_level_op
from vtexit.testing.tiny_models import build_llava_shaped

ALWAYS_DENSE = 10**9


def _counts(fn: Callable[[], object]) -> tuple[int, int, int]:
    """(top-level aten operators, `where` operators at every level, host syncs) of one call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return (
        sum(1 for e in events if is_top_level_op(e)),
        sum(1 for e in events if e.name == "aten::where"),
        sum(1 for e in events if e.name == "aten::_local_scalar_dense"),
    )


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = build_llava_shaped(hidden_size=64, num_layers=args.layers, image_tokens=576, num_heads=4,
                              intermediate_size=128)
    model = case.model.eval()
    inputs = case.inputs([1], text_len=64)
    heads = vtexit.calibrate_heads(model, inputs, keep=0.5, progress=False)
    strategies = {
        "window=5": dict(window=5),
        f"heads (keep {heads.fraction:.2f})": dict(heads=heads),
        "ffn_ratio=2": dict(ffn_ratio=2),
        "all four": dict(window=5, heads=heads, ffn_ratio=2, layer_drop=args.layers // 2),
    }
    configs: dict[str, vtexit.YOPOConfig | None] = {"unpatched": None}
    for name, settings in strategies.items():
        configs[f"{name}, split"] = vtexit.YOPOConfig(**settings, dense_below=0, window_kernel="tiles")
        configs[f"{name}, dense"] = vtexit.YOPOConfig(**settings, dense_below=ALWAYS_DENSE)
    table = Table(title=f"YOPO host work per prefill: LLaVA-shaped, hidden 64, {args.layers} layers, 576 visual + "
                        "64 text tokens, batch 1, CPU")
    for column in ("config", "top-level ops", "x unpatched", "where (all levels)", "host syncs"):
        table.add_column(column, justify="left" if column == "config" else "right")
    base = None
    for name, config in configs.items():
        handle = vtexit.yopo(model, config) if config is not None else None
        try:
            model(**inputs, use_cache=False)  # warm-up: per-patch memos, lazy inits
            ops, where, syncs = _counts(lambda: model(**inputs, use_cache=False))
        finally:
            if handle is not None:
                handle.remove()
        base = base or ops
        table.add_row(name, str(ops), f"{ops / base:.2f}", str(where), str(syncs))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
