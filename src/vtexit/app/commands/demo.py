"""``vtexit demo``: the main job on the built-in default model (calibrate K, baseline vs VTW, the plots).

Only the option checks live here; the run itself is :mod:`vtexit.app.demo`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vtexit.app.common import (
    ETA_DEFAULT,
    ETA_HELP,
    console,
    require_default_model,
    set_threads,
    valid_eta,
    writable_folder,
)


def demo(
    eta: float = typer.Option(ETA_DEFAULT, help=ETA_HELP),
    calibration_rows: int = typer.Option(32, min=1, help="train questions for calibration"),
    test_rows: int = typer.Option(200, min=1, help="fixed test questions for baseline vs VTW"),
    sweep_rows: int = typer.Option(64, min=1, help="test questions for the accuracy-against-K sweep"),
    batch_size: int = typer.Option(8, min=1),
    out: Path = typer.Option(Path("out/demo"), help="folder for results.json and the plots"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """The main job: calibrate K on the default model, evaluate baseline vs VTW, write the plots."""
    from vtexit.app.demo import DemoSettings, run_demo
    from vtexit.default_model.parts import MissingPartError

    require_default_model()

    eta = valid_eta(eta)
    writable_folder(out)
    set_threads(threads)
    settings = DemoSettings(
        eta=eta,
        calibration_rows=calibration_rows,
        test_rows=test_rows,
        sweep_rows=min(sweep_rows, test_rows),
        batch_size=batch_size,
        out=out,
    )
    try:
        run_demo(settings, console)
    except MissingPartError as err:  # a part package installed but broken: its message says how to reinstall
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
