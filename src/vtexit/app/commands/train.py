"""``vtexit train-gates`` and ``vtexit tune``: the commands that train something and save it.

``train-gates`` fits DyVTE's exit gates (the run is :mod:`vtexit.app.train_gates`); ``tune`` fits a LoRA adapter on
the default model while a method is active (the run is :mod:`vtexit.training.default_model`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from vtexit.app.common import (
    METHOD_FORMS,
    MODEL_HELP,
    console,
    load_model,
    method_configs_of,
    parse_layers,
    require_default_model,
    require_for,
    set_threads,
    writable_folder,
)


def train_gates(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help="'easy-vqa' (train split) or a .jsonl of image/question/answer"),
    rows: int = typer.Option(1000, min=1, help="training questions (fixed subset, seeded)"),
    batch_size: int = typer.Option(16, min=1),
    layers: str = typer.Option(None, help="comma-separated exit layers that get a gate (default: every valid one)"),
    answers: str = typer.Option("model", help="labels score 'model' (its own greedy answer) or 'dataset' answers"),
    gate_size: int = typer.Option(
        None, min=1, help="hidden width of each gate (default: LM hidden size / 8, at least 16)"
    ),
    steps: int = typer.Option(400, min=1),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    min_agreement: float = typer.Option(1.0, help="safe exit: share of answer tokens keeping the full top-1"),
    loss_ratio: float = typer.Option(1.03, help="safe exit: answer loss at most this x the full model's"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="exit threshold saved with the gates (default)"),
    labels: Path = typer.Option(None, help="labels file: read if it exists (skips labelling), else written"),
    out: Path = typer.Option(Path("out/gates"), help="folder for the gates and training.json"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Train DyVTE gates: label exits with the model itself (record-and-replay), fit the gates, save them."""
    from vtexit.app.train_gates import ANSWERS, TrainGatesSettings, run_train_gates
    from vtexit.methods.dyvte.labels import LabelRule

    if answers not in ANSWERS:
        raise typer.BadParameter(f"must be one of {list(ANSWERS)}, got {answers!r}", param_hint="--answers")
    try:
        LabelRule(min_agreement, loss_ratio)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    require_for(model, easy_vqa=dataset == "easy-vqa")
    writable_folder(out)
    set_threads(threads)
    source = load_model(model, "sdpa")
    if answers == "dataset" and source.processor is None:
        raise typer.BadParameter("dataset answers need a model with a processor (not 'tiny')", param_hint="--answers")
    settings = TrainGatesSettings(
        dataset=dataset,
        rows=rows,
        batch_size=batch_size,
        layers=parse_layers(layers),
        answers=answers,
        gate_size=gate_size,
        steps=steps,
        lr=lr,
        seed=seed,
        min_agreement=min_agreement,
        loss_ratio=loss_ratio,
        threshold=threshold,
        labels=labels,
        out=out,
    )
    try:
        run_train_gates(source, settings, console)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def tune(
    layers: str = typer.Option("3-10", help="VTW: K drawn per step uniformly from 'a-b' or 'a,b,c'"),
    full: float = typer.Option(0.2, help="share of steps without withdrawal (K = N), so nothing is lost there"),
    config: list[str] = typer.Option(None, help=f"instead of --layers: methods, drawn uniformly; each {METHOD_FORMS}"),
    steps: int = typer.Option(700, min=1),
    lr: float = typer.Option(4e-4),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(8, min=1, help="sequences (images) per step"),
    turns: int = typer.Option(5, min=1, help="max question/answer turns per sequence"),
    train_images: int = typer.Option(2000, min=1, help="easy-vqa train images used (seeded subset)"),
    lora_r: int = typer.Option(16, min=1),
    lora_alpha: float = typer.Option(32.0),
    fp32: bool = typer.Option(False, help="no bfloat16 autocast"),
    out: Path = typer.Option(Path("out/tune/adapter.safetensors"), help="LoRA adapter file (float16 safetensors)"),
    work_dir: Path = typer.Option(Path("out/tune"), help="folder for loss_log.jsonl, summary.json, cached pixels"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Tune the default model with LoRA while a method is active (VTW with K drawn per step), save the adapter."""
    from vtexit.training import ConfigSampler, LoraSettings, vtw_sampler
    from vtexit.training.default_model import tune_default_model
    from vtexit.training.sampler import parse_layer_spec

    configs = [c for _, c in method_configs_of(config or [], "--config")]
    try:
        if configs:
            sampler = ConfigSampler(tuple(configs))
        else:
            sampler = vtw_sampler(parse_layer_spec(layers), full=full)
        lora = LoraSettings(r=lora_r, alpha=lora_alpha)
    except (ValueError, TypeError) as err:
        raise typer.BadParameter(str(err)) from None
    require_default_model()
    writable_folder(work_dir, "--work-dir")
    writable_folder(out.parent)
    set_threads(threads)
    result = tune_default_model(
        sampler, steps=steps, out=out, lr=lr, seed=seed, lora=lora, images=train_images, turns=turns,
        batch=batch_size, bf16=not fp32, work_dir=work_dir,
    )  # fmt: skip
    console.print(
        f"tuned {steps} steps in {result.seconds:.0f}s (loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}); "
        f"wrote {out} and {work_dir / 'loss_log.jsonl'}"
    )
