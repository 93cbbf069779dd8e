"""``vtexit calibrate`` and ``vtexit calibrate-heads``: the settings a method needs, read off a few questions.

VTW's withdrawal layer K from the KL curve; YOPO's head masks from per-head votes.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vtexit.app.common import (
    ETA_DEFAULT,
    ETA_HELP,
    MODEL_HELP,
    console,
    load_model,
    require_for,
    set_threads,
    valid_eta,
    writable_folder,
)


def calibrate(
    model: str = typer.Option("default", help=MODEL_HELP),
    eta: float = typer.Option(ETA_DEFAULT, help=ETA_HELP),
    rows: int = typer.Option(16, min=1, help="calibration questions (easy-vqa train split)"),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/calibrate"), help="folder for kl.json and kl_curve.png"),
    attn: str = typer.Option("sdpa", help="attention implementation: sdpa or eager"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Choose VTW's withdrawal layer K: the first K whose mean KL <= eta; prints the whole curve."""
    from vtexit.evaluation.plots import plot_kl
    from vtexit.evaluation.report import kl_table
    from vtexit.methods.vtw.calibrate import calibrate as run

    eta = valid_eta(eta)
    require_for(model, easy_vqa=True)
    writable_folder(out)
    set_threads(threads)
    source = load_model(model, attn)
    batches = source.make_batches(rows, batch_size, "train", seed)
    result = run(source.model, batches, eta=eta)
    console.print(kl_table(result))
    console.print(
        f"[bold]{source.name}[/]: withdraw visual tokens at K = [bold green]{result.layer}[/] of {result.num_layers}"
    )
    result.to_json(out / "kl.json")
    plot_kl(result, out / "kl_curve.png")
    console.print(f"wrote {out / 'kl.json'} and {out / 'kl_curve.png'}")


def calibrate_heads(
    model: str = typer.Option("default", help=MODEL_HELP),
    keep: float = typer.Option(0.5, min=0.0, max=1.0, help="about this share of heads stays active"),
    vote: float = typer.Option(0.4, min=0.0, max=1.0, help="active when passing on more than this share of rows"),
    rows: int = typer.Option(32, min=1, help="calibration questions (easy-vqa train split)"),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/heads.json"), help="where to save the mask (.json or .safetensors)"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """YOPO's head masks: which attention heads visual tokens need, per layer (use with --method yopo:heads=OUT)."""
    from vtexit.methods.yopo import calibrate_heads as run

    if out.suffix not in (".json", ".safetensors"):
        raise typer.BadParameter(f"must end in .json or .safetensors, got {out.name!r}", param_hint="--out")
    require_for(model, easy_vqa=True)
    writable_folder(out.parent)
    set_threads(threads)
    source = load_model(model, "sdpa")
    batches = source.make_batches(rows, batch_size, "train", seed)
    try:
        mask = run(source.model, batches, keep=keep, vote=vote)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--keep/--vote") from None
    per_layer = " ".join(str(int(n)) for n in mask.active.sum(1).tolist())
    console.print(f"[bold]{source.name}[/]: {100 * mask.fraction:.0f}% of heads active; per layer: {per_layer}")
    mask.save(out)
    console.print(f"wrote {out}")
