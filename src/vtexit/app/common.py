"""What the ``vtexit`` commands share: the console, the ``--model`` help, and the checks and loading that every
command runs before its slow part, so that a bad option fails in one clear line (no trace) before any work.

The command modules (:mod:`vtexit.app.commands`) import from here; this module imports none of them. Like them, it
imports torch, transformers and vtexit's engine only inside the functions that use them, so that ``vtexit --help``
starts without them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from vtexit.app.model_sources import ModelSource
    from vtexit.evaluation.datasets import VQARecord
    from vtexit.methods.base import MethodConfig

# Where no terminal can be asked (output to a file or a CI log, COLUMNS unset), rich would assume 80 columns: too
# narrow for the result tables, whose nine columns then shrink to a few characters each.
NO_TERMINAL_WIDTH = 160


def console_width() -> int | None:
    """The console's fixed width: None (rich follows the terminal, measured again at every print, or COLUMNS) when
    COLUMNS is set or any of stdout, stderr and stdin is a terminal, as in ``vtexit sweep | tee log``; else
    :data:`NO_TERMINAL_WIDTH`."""
    if os.environ.get("COLUMNS", "").isdigit():
        return None
    for descriptor in (1, 2, 0):  # stdout, stderr, stdin: what rich asks too
        try:
            os.get_terminal_size(descriptor)
        except (ValueError, OSError):
            continue
        return None
    return NO_TERMINAL_WIDTH


console = Console(width=console_width())

MODEL_HELP = "'default' (mini-LLaVA built from PyPI parts), 'tiny' (random LLaVA) or a local model folder"
ATTENTION = ("sdpa", "eager")
# VTW's default KL threshold, as a number for --help: vtexit.methods.vtw.calibrate.DEFAULT_ETA, which this module
# cannot import (it loads torch; `vtexit --help` must not). tests/test_cli.py checks that the two agree.
ETA_DEFAULT = 0.05
ETA_HELP = "KL threshold: K is the first layer whose mean KL <= eta"
METHOD_FORMS = "name:key=value,... (e.g. fastv:layer=2,keep=0.5) or a JSON object"


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"layers must be comma-separated integers, got {text!r}") from None


def set_threads(threads: int) -> None:
    """``--threads``: torch's intra-op threads, left at torch's default for 0."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def require(modules: tuple[str, ...], install: str, what: str) -> None:
    """Exit with one line naming the missing packages and the install command (no trace) if any is missing."""
    from vtexit.app.model_sources import missing_modules

    missing = missing_modules(modules)
    if missing:
        typer.echo(
            f"error: {what} needs Python packages that are not installed ({', '.join(missing)}); "
            f"install them with: {install}",
            err=True,
        )
        raise typer.Exit(1)


def require_default_model() -> None:
    from vtexit.app import model_sources

    require(model_sources.DEFAULT_MODEL_MODULES, model_sources.DEFAULT_MODEL_INSTALL, "the default model")


def require_for(model: str, *, easy_vqa: bool) -> None:
    """Check, before any work, the packages that ``--model model`` (and easy-vqa data, if used) need."""
    from vtexit.app.model_sources import EASY_VQA_INSTALL

    if model in ("default", "withdrawal-tuned"):
        require_default_model()
    elif model != "tiny" and easy_vqa:
        require(("easy_vqa",), EASY_VQA_INSTALL, "easy-vqa data")


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """Create ``folder`` (and parents) and check a file can be written there, before any slow work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise typer.BadParameter(f"cannot write to the folder {str(folder)!r}: {reason}", param_hint=option) from None
    return folder


def method_points(texts: list[str], option: str) -> list[dict[str, Any]]:
    """Methods named on the command line (either form, :mod:`vtexit.app.method_spec`) as dicts, each checked by
    its config now, before any model is loaded: a bad form or setting is one line naming ``option``."""
    from vtexit.app.method_spec import config_of_point, parse_method_point

    points = []
    for text in texts:
        try:
            point = parse_method_point(text)
            config_of_point(point)
        except (ValueError, TypeError) as err:  # a config's constructor may raise TypeError (a missing argument)
            raise typer.BadParameter(str(err), param_hint=option) from None
        points.append(point)
    return points


def method_configs_of(texts: list[str], option: str) -> list[tuple[str, MethodConfig]]:
    """``(name, config)`` per method named on the command line: the name is its ``label``, else the text as given."""
    from vtexit.app.method_spec import config_of_point

    points = method_points(texts, option)
    return [(str(p.get("label", text.strip())), config_of_point(p)) for text, p in zip(texts, points, strict=True)]


def valid_eta(eta: float | None) -> float:
    """``--eta``, or VTW's default when not given, checked (finite, >= 0)."""
    from vtexit.methods.vtw.calibrate import DEFAULT_ETA, check_eta

    try:
        return check_eta(DEFAULT_ETA if eta is None else eta)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--eta") from None


def load_model(model: str, attn: str, *, with_processor: bool = True) -> ModelSource:
    """``--model`` loaded; a bad name or folder, or a broken part package, is a clear error."""
    from vtexit.app.model_sources import MissingPackageError, load_source
    from vtexit.default_model.parts import MissingPartError

    if attn not in ATTENTION:
        raise typer.BadParameter(f"must be one of {list(ATTENTION)}, got {attn!r}", param_hint="--attn")
    try:
        with console.status(f"loading model {model!r}"):
            return load_source(model, attn_implementation=attn, with_processor=with_processor)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    except (MissingPartError, MissingPackageError) as err:  # the message names what to (re)install
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def questions_and_model(
    model: str, dataset: str, rows: int, seed: int, threads: int, what: str
) -> tuple[list[VQARecord], ModelSource]:
    """The fixed test questions and the loaded model with its processor, with every check before the slow part."""
    from vtexit.app.model_sources import EASY_VQA_INSTALL
    from vtexit.evaluation.datasets.select import fixed_subset, load_dataset

    if dataset == "easy-vqa":
        require(("easy_vqa",), EASY_VQA_INSTALL, "the easy-vqa dataset")
    require_for(model, easy_vqa=False)
    set_threads(threads)
    try:
        records = fixed_subset(load_dataset(dataset, "test"), rows, seed)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--dataset") from None
    source = load_model(model, "sdpa")
    if model == "tiny":  # the tiny random LLaVA with a word-level processor: it answers any dataset (badly)
        from vtexit.app.model_sources import with_tiny_processor

        source = with_tiny_processor(source)
    if source.processor is None:
        raise typer.BadParameter(f"{what} needs a model with a processor", param_hint="--model")
    return records, source
