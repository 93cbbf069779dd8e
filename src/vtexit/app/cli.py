"""``vtexit`` command line: calibrate K, benchmark VTW, count FLOPs (typer + rich)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual-token exit for multimodal LLMs.")
console = Console(width=None if sys.stdout.isatty() else 160)


def _versions(value: bool) -> None:
    """``--version``: vtexit's version and the torch and transformers it runs on, beside the tested ranges."""
    if not value:
        return
    from importlib.metadata import version

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


MODEL_HELP = "'default' (mini-LLaVA built from PyPI parts), 'tiny' (random LLaVA) or a local model folder"


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"layers must be comma-separated integers, got {text!r}") from None


ATTENTION = ("sdpa", "eager")


def _require(modules: tuple[str, ...], install: str, what: str) -> None:
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


def _require_default_model() -> None:
    from vtexit.app import model_sources

    _require(model_sources.DEFAULT_MODEL_MODULES, model_sources.DEFAULT_MODEL_INSTALL, "the default model")


def _require_for(model: str, *, easy_vqa: bool) -> None:
    """Check, before any work, the packages that ``--model model`` (and easy-vqa data, if used) need."""
    from vtexit.app.model_sources import EASY_VQA_INSTALL

    if model in ("default", "withdrawal-tuned"):
        _require_default_model()
    elif model != "tiny" and easy_vqa:
        _require(("easy_vqa",), EASY_VQA_INSTALL, "easy-vqa data")


def _writable_folder(folder: Path, option: str = "--out") -> Path:
    """Create ``folder`` (and parents) and check a file can be written there, before any slow work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise typer.BadParameter(f"cannot write to the folder {str(folder)!r}: {reason}", param_hint=option) from None
    return folder


def _eta(eta: float | None) -> float:
    from vtexit.methods.vtw.calibrate import DEFAULT_ETA, check_eta

    try:
        return check_eta(DEFAULT_ETA if eta is None else eta)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--eta") from None


def _load(model: str, attn: str, *, with_processor: bool = True):
    from vtexit.app.model_sources import load_source
    from vtexit.default_model.parts import MissingPartError

    if attn not in ATTENTION:
        raise typer.BadParameter(f"must be one of {list(ATTENTION)}, got {attn!r}", param_hint="--attn")
    try:
        with console.status(f"loading model {model!r}"):
            return load_source(model, attn_implementation=attn, with_processor=with_processor)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    except MissingPartError as err:  # a part package installed but broken: its message says how to reinstall
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def _test_questions_and_model(model: str, dataset: str, rows: int, seed: int, threads: int, what: str):
    """The fixed test questions and the loaded model with its processor, with every check before the slow part."""
    from vtexit.app.model_sources import EASY_VQA_INSTALL
    from vtexit.evaluation.datasets.select import fixed_subset, load_dataset

    if dataset == "easy-vqa":
        _require(("easy_vqa",), EASY_VQA_INSTALL, "the easy-vqa dataset")
    _require_for(model, easy_vqa=False)
    if threads:
        torch.set_num_threads(threads)
    try:
        records = fixed_subset(load_dataset(dataset, "test"), rows, seed)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--dataset") from None
    source = _load(model, "sdpa")
    if source.processor is None:
        raise typer.BadParameter(f"{what} needs a model with a processor (not 'tiny')", param_hint="--model")
    return records, source


@app.command()
def calibrate(
    model: str = typer.Option("default", help=MODEL_HELP),
    eta: float = typer.Option(None, help="KL threshold (default: vtexit.methods.vtw.calibrate.DEFAULT_ETA)"),
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

    eta = _eta(eta)
    _require_for(model, easy_vqa=True)
    _writable_folder(out)
    if threads:
        torch.set_num_threads(threads)
    source = _load(model, attn)
    batches = source.make_batches(rows, batch_size, "train", seed)
    result = run(source.model, batches, eta=eta)
    console.print(kl_table(result))
    console.print(
        f"[bold]{source.name}[/]: withdraw visual tokens at K = [bold green]{result.layer}[/] of {result.num_layers}"
    )
    result.to_json(out / "kl.json")
    plot_kl(result, out / "kl_curve.png")
    console.print(f"wrote {out / 'kl.json'} and {out / 'kl_curve.png'}")


@app.command("calibrate-heads")
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
    _require_for(model, easy_vqa=True)
    _writable_folder(out.parent)
    if threads:
        torch.set_num_threads(threads)
    source = _load(model, "sdpa")
    batches = source.make_batches(rows, batch_size, "train", seed)
    try:
        mask = run(source.model, batches, keep=keep, vote=vote)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--keep/--vote") from None
    per_layer = " ".join(str(int(n)) for n in mask.active.sum(1).tolist())
    console.print(f"[bold]{source.name}[/]: {100 * mask.fraction:.0f}% of heads active; per layer: {per_layer}")
    mask.save(out)
    console.print(f"wrote {out}")


@app.command()
def bench(
    model: str = typer.Option("default", help=MODEL_HELP),
    layers: str = typer.Option(None, help="comma-separated K values (default: N/4, N/2, 3N/4)"),
    batch_size: int = typer.Option(1, min=1),
    new_tokens: int = typer.Option(32, min=2),
    repeats: int = typer.Option(5, min=1),
    seed: int = typer.Option(0),
    attn: str = typer.Option("sdpa", help="attention implementation: sdpa or eager"),
    threads: int = typer.Option(1, help="torch threads (1 gives the steadiest numbers)"),
) -> None:
    """Latency, decode time and KV bytes of VTW vs the unpatched model, with the FLOPs ratio beside them."""
    from vtexit.core.flops import FORMULA
    from vtexit.evaluation.bench import bench_withdrawal
    from vtexit.evaluation.report import bench_table
    from vtexit.methods.vtw import check_layer, valid_layer_range

    _require_for(model, easy_vqa=True)
    if threads:
        torch.set_num_threads(threads)
    source = _load(model, attn)
    low, n = valid_layer_range(source.model)
    ks = _parse_layers(layers) or sorted({max(low, n // 4), max(low, n // 2), max(low, 3 * n // 4)})
    try:
        ks = [check_layer(source.model, k) for k in ks]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--layers") from None
    inputs = source.make_batches(batch_size, batch_size, "test", seed)[0]
    rows = bench_withdrawal(source.model, inputs, ks, repeats=repeats, new_tokens=new_tokens)
    console.print(bench_table(rows))
    console.print(f"[dim]FLOPs: {escape(FORMULA)}[/]")


@app.command()
def flops(
    model: str = typer.Option("default", help=MODEL_HELP),
    layer: int = typer.Option(..., help="withdrawal layer K"),
    prompt_tokens: int = typer.Option(..., min=1),
    visual_tokens: int = typer.Option(..., min=0),
) -> None:
    """Analytic prefill and per-decode-token FLOPs of VTW at K vs the unpatched model."""
    from vtexit.core.flops import FORMULA, DecoderShape, count, withdrawal_tokens
    from vtexit.methods.vtw import check_layer

    _require_for(model, easy_vqa=False)
    source = _load(model, "sdpa", with_processor=False)  # shapes come from the config: no processor needed
    try:
        check_layer(source.model, layer)
        shape = DecoderShape.from_model(source.model)
        base = count(shape, withdrawal_tokens(shape.num_layers, prompt_tokens, visual_tokens, shape.num_layers))
        vtw = count(shape, withdrawal_tokens(shape.num_layers, prompt_tokens, visual_tokens, layer))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console.print(
        f"prefill: {base.prefill / 1e9:.3f} -> {vtw.prefill / 1e9:.3f} GFLOPs ({base.prefill / vtw.prefill:.2f}x)"
    )
    console.print(
        f"decode/token: {base.decode_per_token / 1e6:.2f} -> {vtw.decode_per_token / 1e6:.2f} MFLOPs "
        f"({base.decode_per_token / vtw.decode_per_token:.2f}x)"
    )
    console.print(f"[dim]{escape(FORMULA)}[/]")


@app.command()
def evaluate(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help="'easy-vqa' (test split) or a .jsonl of image/question/answer"),
    layer: list[int] = typer.Option([], help="VTW layer K to evaluate (repeat for several); baseline always runs"),
    method: list[str] = typer.Option(
        [], help="any method by name and settings, e.g. 'dyvte:gates=out/gates,threshold=0.7' (repeat for several)"
    ),
    rows: int = typer.Option(200, min=1, help="fixed subset size (seeded)"),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/evaluate/results.json"), help="JSON file for all results"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    cache: str = typer.Option(
        "dynamic", help="generate's KV cache: dynamic, or static (transformers' static cache; compiled decode on a GPU)"
    ),
) -> None:
    """Exact-match accuracy (overall, per type), latency and FLOPs per sample: baseline and VTW at each K.

    The configurations are timed interleaved, batch by batch; times are medians of per-batch times.
    """
    from vtexit.evaluation.batches import generate_cache_kwargs
    from vtexit.evaluation.evaluate import evaluate_interleaved, save_results
    from vtexit.evaluation.report import results_table
    from vtexit.methods.vtw import check_layer, withdraw

    try:
        generate_cache_kwargs(cache)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--cache") from None
    if out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} is a folder; give the path of a .json file", param_hint="--out")
    _writable_folder(out.parent)
    records, source = _test_questions_and_model(model, dataset, rows, seed, threads, "evaluation")
    try:
        ks = [check_layer(source.model, k) for k in layer]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--layer") from None
    methods = {"baseline": None, **{f"VTW K={k}": (lambda m, k=k: withdraw(m, layer=k)) for k in ks}}
    methods.update(_named_methods(source.model, method))
    results = evaluate_interleaved(
        source.model,
        source.processor,
        records,
        source.prompt,
        methods,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        cache_implementation=cache,
    )
    console.print(results_table(results, results[0], dataset=dataset))
    console.print(f"wrote {save_results(results, out)}")


def _named_methods(model, specs: list[str]) -> dict:
    """``--method`` specs -> {spec: method}; each is applied once first, so a bad setting fails before any work."""
    from vtexit.app.method_spec import parse_method_spec
    from vtexit.methods.registry import apply

    methods = {}
    for spec in specs:
        try:
            config = parse_method_spec(spec)
            apply(model, config).remove()
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--method") from None
        methods[spec] = lambda m, c=config: apply(m, c)
    return methods


@app.command()
def demo(
    eta: float = typer.Option(None, help="KL threshold (default: vtexit.methods.vtw.calibrate.DEFAULT_ETA)"),
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

    _require_default_model()

    eta = _eta(eta)
    _writable_folder(out)
    if threads:
        torch.set_num_threads(threads)
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


@app.command("train-gates")
def train_gates(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help="'easy-vqa' (train split) or a .jsonl of image/question/answer"),
    rows: int = typer.Option(1000, min=1, help="training questions (fixed subset, seeded)"),
    batch_size: int = typer.Option(16, min=1),
    layers: str = typer.Option(None, help="comma-separated exit layers that get a gate (default: every valid one)"),
    answers: str = typer.Option("model", help="labels score 'model' (its own greedy answer) or 'dataset' answers"),
    gate_size: int = typer.Option(None, min=1, help="hidden width of each gate (default: LM hidden size / 8)"),
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
    _require_for(model, easy_vqa=dataset == "easy-vqa")
    _writable_folder(out)
    if threads:
        torch.set_num_threads(threads)
    source = _load(model, "sdpa")
    if answers == "dataset" and source.processor is None:
        raise typer.BadParameter("dataset answers need a model with a processor (not 'tiny')", param_hint="--answers")
    settings = TrainGatesSettings(
        dataset=dataset,
        rows=rows,
        batch_size=batch_size,
        layers=_parse_layers(layers),
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


EXAMPLE_POINT = '{"method": "vtw", "layer": 16}'


def _sweep_grid(config: list[str], grid: Path | None) -> list[dict] | None:
    """Sweep points from ``--config`` JSON objects and a ``--grid`` JSON file (None: the default grid)."""
    import json

    points: list[dict] = []
    if grid is not None:
        try:
            data = json.loads(grid.read_text())
        except (OSError, json.JSONDecodeError) as err:
            message = f"cannot read a JSON list of configs from {str(grid)!r}: {err}"
            raise typer.BadParameter(message, param_hint="--grid") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            message = f"{str(grid)!r} must hold a JSON list of config objects like {EXAMPLE_POINT}"
            raise typer.BadParameter(message, param_hint="--grid")
        points += data
    for text in config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise typer.BadParameter(f"not valid JSON ({err.msg}): {text!r}", param_hint="--config") from None
        if not isinstance(data, dict):
            message = f"must be a JSON object like {EXAMPLE_POINT}, got {text!r}"
            raise typer.BadParameter(message, param_hint="--config")
        points.append(data)
    return points or None


@app.command()
def sweep(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help="'easy-vqa' (test split) or a .jsonl of image/question/answer"),
    rows: int = typer.Option(64, min=1, help="fixed subset size (seeded)"),
    config: list[str] = typer.Option(
        [], help='a point as JSON, e.g. \'{"method": "fastv", "layer": 2, "keep": 0.5}\' (repeat; replaces the grid)'
    ),
    grid: Path = typer.Option(None, help="JSON file with a list of such points (replaces the default grid)"),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/sweep"), help="folder for sweep.json, sweep.md, pareto.png and pareto_time.png"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Methods x budgets on one dataset: accuracy, prefill FLOPs and interleaved median times, and a Pareto plot.

    Default grid (N decoder layers): VTW at N/2, 3N/4, 4N/5; FastV and a random drop at layer 2 keeping 1/2 and
    1/4; PyramidDrop with stages at N/4, N/2, 3N/4 keeping 1/2 and 1/4; on the default model also DyVTE with its
    shipped gates. Any registered method can be a point.
    """
    from rich.table import Table

    from vtexit.evaluation.sweep import COLUMNS, resolve_grid, run_sweep, save_sweep, table_rows

    points = _sweep_grid(config, grid)
    _writable_folder(out)
    records, source = _test_questions_and_model(model, dataset, rows, seed, threads, "the sweep")
    if points is None and model == "default":  # the default model ships DyVTE gates: sweep them too
        from vtexit.evaluation.sweep import default_grid

        points = [*default_grid(source.model), {"method": "dyvte"}]
    if points is not None:
        try:
            resolve_grid(source.model, points)  # every setting checked against the model before any evaluation
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--config/--grid") from None
    results = run_sweep(
        source.model,
        source.processor,
        records,
        source.prompt,
        points,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    title = f"{source.name}, {dataset}, {len(records)} questions"
    table = Table(title=f"{title} (exact match; times: medians of interleaved batches)")
    for name in COLUMNS:
        table.add_column(name, justify="right")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    paths = save_sweep(results, out, title=title)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']} and {paths['time_plot']}")


@app.command()
def tune(
    layers: str = typer.Option("3-10", help="VTW: K drawn per step uniformly from 'a-b' or 'a,b,c'"),
    full: float = typer.Option(0.2, help="share of steps without withdrawal (K = N), so nothing is lost there"),
    config: list[str] = typer.Option(None, help="instead of --layers: method configs as JSON, drawn uniformly"),
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
    import json

    from vtexit.methods.registry import config_from_dict
    from vtexit.training import ConfigSampler, LoraSettings, vtw_sampler
    from vtexit.training.default_model import tune_default_model
    from vtexit.training.sampler import parse_layer_spec

    try:
        if config:
            sampler = ConfigSampler(tuple(config_from_dict(json.loads(c)) for c in config))
        else:
            sampler = vtw_sampler(parse_layer_spec(layers), full=full)
        lora = LoraSettings(r=lora_r, alpha=lora_alpha)
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError; a missing setting a TypeError
        raise typer.BadParameter(str(err)) from None
    _require_default_model()
    _writable_folder(work_dir, "--work-dir")
    _writable_folder(out.parent)
    if threads:
        torch.set_num_threads(threads)
    result = tune_default_model(
        sampler, steps=steps, out=out, lr=lr, seed=seed, lora=lora, images=train_images, turns=turns,
        batch=batch_size, bf16=not fp32, work_dir=work_dir,
    )  # fmt: skip
    console.print(
        f"tuned {steps} steps in {result.seconds:.0f}s (loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}); "
        f"wrote {out} and {work_dir / 'loss_log.jsonl'}"
    )


if __name__ == "__main__":
    app()
