"""``vtexit`` command line: calibrate K, benchmark VTW, count FLOPs (typer + rich).

This module is the root typer app (the console script ``vtexit = vtexit.app.cli:app``): ``--version`` and the
registration of the commands, in the order ``vtexit --help`` lists them. Each command lives in its group's module
under :mod:`vtexit.app.commands`; what they share is :mod:`vtexit.app.common`. None of these modules imports torch,
transformers or vtexit's engine at import time (the commands import them when they run), so ``vtexit --help``
starts in a fraction of a second; tests/test_cli.py checks it.
"""

from __future__ import annotations

import typer

from vtexit.app.commands import bench, calibrate, demo, evaluate, methods, train
from vtexit.app.common import console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual-token exit for multimodal LLMs.")


def _versions(value: bool) -> None:
    """``--version``: vtexit's version and the torch and transformers it runs on, beside the tested ranges."""
    if not value:
        return
    from importlib.metadata import version

    import torch
    import transformers

    from vtexit.core.torch_support import TESTED_TORCH_FLOOR, is_tested_torch
    from vtexit.core.transformers_compat import TESTED_RANGE, is_tested_version

    def verdict(inside: bool) -> str:
        return "tested" if inside else "OUTSIDE the tested range"

    console.print(
        f"vtexit {version('vtexit')}\n"
        f"torch {torch.__version__} ({verdict(is_tested_torch())}: >={TESTED_TORCH_FLOOR})\n"
        f"transformers {transformers.__version__} ({verdict(is_tested_version())}: {TESTED_RANGE})",
        highlight=False,
    )
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_versions, is_eager=True, help="vtexit, torch and transformers versions"
    ),
) -> None:
    """Visual-token exit for multimodal LLMs."""


app.command()(calibrate.calibrate)
app.command("calibrate-heads")(calibrate.calibrate_heads)
app.command()(bench.bench)
app.command()(bench.flops)
app.command()(evaluate.evaluate)
app.command()(demo.demo)
app.command("train-gates")(train.train_gates)
app.command()(evaluate.sweep)
app.command()(train.tune)
app.command()(methods.methods)


if __name__ == "__main__":
    app()
