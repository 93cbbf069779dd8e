"""Where VTW's time goes on the device: busy time against wall time, kernels launched, and the top kernels, for the
runs whose GPU numbers miss issue 19's targets (batch-1 prefill, eager and compiled; static-cache decode at batch 16
x 2304 visual tokens), without vtexit and under VTW, side by side.

Busy / wall near 1 means the device is the bound (then withdrawal's FLOPs should show); well below 1 means the host
is (then only fewer kernels or CUDA graphs help). On the CPU it runs a small shape and counts top-level operators.

    python benchmarks/profile_vtw.py [--device cuda] [--layers 8] [--out out/profile.json]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch
from bench_speed import SHAPES, batch_inputs, build_model, results_header, write_results
from rich.console import Console
from rich.table import Table

from vtexit.evaluation.device_profile import DeviceProfile, profile_prefill, profile_static_decode


def _tables(rows: list[DeviceProfile], title: str) -> list[Table]:
    summary = Table(title=title)
    for name in ("config", "wall ms", "busy ms", "busy / wall", "kernels"):
        summary.add_column(name, justify="right")
    for row in rows:
        summary.add_row(
            row.label,
            f"{1e3 * row.wall_s:.3f}",
            "-" if row.busy_s is None else f"{1e3 * row.busy_s:.3f}",
            "-" if row.busy_share is None else f"{row.busy_share:.2f}",
            f"{row.kernels:.0f}",
        )
    tops = []
    for row in rows:
        top = Table(title=f"{title}: top kernels, {row.label}")
        for name in ("kernel", "launches", "ms"):
            top.add_column(name, justify="right" if name != "kernel" else "left")
        for share in row.top:
            top.add_row(share.name[:90], f"{share.calls:.1f}", f"{1e3 * share.seconds:.3f}")
        tops.append(top)
    return [summary, *tops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, small on CPU")
    parser.add_argument("--layers", default=None, help="withdrawal layers K, comma-separated (default 8; 4 on small)")
    parser.add_argument("--prefill-visual", type=int, default=None, help="default 576 (CUDA), 64 (CPU); batch 1")
    parser.add_argument("--decode-visual", type=int, default=None, help="default 2304 (CUDA), 64 (CPU)")
    parser.add_argument("--decode-batch", type=int, default=None, help="default 16 (CUDA), 4 (CPU)")
    parser.add_argument("--compile-mode", default="default,reduce-overhead",
                        help="prefill compile modes besides eager, comma-separated (default, reduce-overhead; none)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("out/profile.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = args.shape or ("7b" if cuda else "small")
    layers = [int(k) for k in (args.layers or ("8" if shape == "7b" else "4")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32
    modes = [m for m in args.compile_mode.split(",") if m and m != "none"]
    console = Console(width=170)
    results = results_header(device, shape, dtype)
    runs = [("prefill", args.prefill_visual or (576 if cuda else 64), 1),
            ("decode", args.decode_visual or (2304 if cuda else 64), args.decode_batch or (16 if cuda else 4))]
    for kind, visual, batch in runs:
        model, case = build_model(SHAPES[shape], visual, device, dtype)
        inputs = batch_inputs(case, batch, device, dtype)
        if kind == "prefill":
            groups = [profile_prefill(model, inputs, layers)]
            groups += [profile_prefill(model, inputs, layers, compile_mode=mode) for mode in modes]
        else:
            groups = [profile_static_decode(model, inputs, layers, new_tokens=args.new_tokens)]
        for rows in groups:
            title = f"{rows[0].run}, {visual} visual + 64 text, batch {batch}, {shape} ({dtype})"
            for table in _tables(rows, title):
                console.print(table)
            results["runs"].append(dict(visual=visual, batch=batch, rows=[asdict(row) for row in rows]))
        del model, case
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    write_results(args.out, results, console)


if __name__ == "__main__":
    main()
