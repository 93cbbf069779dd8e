"""``vtexit evaluate`` and ``vtexit sweep``: accuracy, FLOPs and interleaved times on fixed test questions.

``evaluate`` compares a few named configurations with the baseline; ``sweep`` runs a grid of methods x budgets and
draws the Pareto plots. Both check every setting against the loaded model before the first evaluation.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vtexit.app.common import (
    METHOD_FORMS,
    MODEL_HELP,
    console,
    method_configs_of,
    method_points,
    questions_and_model,
    writable_folder,
)

EXAMPLE_POINT = '{"method": "vtw", "layer": 16}'
DATASET_HELP = "'easy-vqa' (test split) or a .jsonl of image/question/answer lines (docs/cli.md#datasets)"


def evaluate(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help=DATASET_HELP),
    layer: list[int] = typer.Option([], help="VTW layer K to evaluate (repeat for several); baseline always runs"),
    method: list[str] = typer.Option([], help=f"any method with its settings: {METHOD_FORMS} (repeat for several)"),
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
    """Accuracy (exact match, per type), latency and FLOPs per sample: baseline, each --layer (VTW), each --method.

    The configurations are timed interleaved, batch by batch; times are medians of per-batch times (fewer than 5
    batches are flagged as noise-prone).
    """
    from vtexit.evaluation.batches import generate_cache_kwargs
    from vtexit.evaluation.evaluate import evaluate_interleaved, save_results
    from vtexit.evaluation.report import results_table
    from vtexit.methods.vtw import check_layer, withdraw

    try:
        generate_cache_kwargs(cache)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--cache") from None
    named = method_configs_of(method, "--method")  # every spec checked before any model is loaded
    if out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} is a folder; give the path of a .json file", param_hint="--out")
    writable_folder(out.parent)
    records, source = questions_and_model(model, dataset, rows, seed, threads, "evaluation")
    try:
        ks = [check_layer(source.model, k) for k in layer]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--layer") from None
    methods = {"baseline": None, **{f"VTW K={k}": (lambda m, k=k: withdraw(m, layer=k)) for k in ks}}
    methods.update(_named_methods(source.model, named))
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


def _named_methods(model, named: list) -> dict:
    """``(name, config)`` of the ``--method`` specs -> {name: method}; each is applied once first, so a setting the
    model refuses fails before any work."""
    from vtexit.methods.patch import apply

    methods = {}
    for name, config in named:
        try:
            apply(model, config).remove()
        except ValueError as err:
            raise typer.BadParameter(f"{name}: {err}", param_hint="--method") from None
        methods[name] = lambda m, c=config: apply(m, c)
    return methods


def _sweep_grid(config: list[str], grid: Path | None) -> list[dict] | None:
    """Sweep points from ``--config`` (either method form) and a ``--grid`` JSON file (None: the default grid), each
    checked by its config before any model is loaded."""
    import json

    from vtexit.app.method_spec import config_of_point

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
        for i, point in enumerate(data):
            try:
                config_of_point(point)
            except (ValueError, TypeError) as err:
                raise typer.BadParameter(f"point {i} {point}: {err}", param_hint="--grid") from None
        points += data
    points += method_points(config, "--config")
    return points or None


def sweep(
    model: str = typer.Option("default", help=MODEL_HELP),
    dataset: str = typer.Option("easy-vqa", help=DATASET_HELP),
    rows: int = typer.Option(64, min=1, help="fixed subset size (seeded)"),
    config: list[str] = typer.Option([], help=f"a point: {METHOD_FORMS} (repeat; replaces the default grid)"),
    grid: Path = typer.Option(
        None, help=f"JSON file with a list of points like {EXAMPLE_POINT} (replaces the default grid)"
    ),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out/sweep"), help="folder for sweep.json, sweep.md, pareto.png and pareto_time.png"),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
) -> None:
    """Methods x budgets on one dataset: accuracy, prefill FLOPs and interleaved median times, and a Pareto plot.

    Default grid (N decoder layers): VTW at N/2, 3N/4, 4N/5; FastV, the random drop and DART at layer 2 keeping 1/2
    and 1/4; PyramidDrop with stages at N/4, N/2, 3N/4 keeping 1/2 and 1/4; where the model allows them, DivPrune
    and VisionZip keeping 1/2 and 1/4 and 2 x 2 pooling; on the default model also DyVTE with its shipped gates.
    Any registered method can be a point (vtexit methods lists them).
    """
    from vtexit.evaluation.sweep import resolve_grid, run_sweep, save_sweep, sweep_table

    points = _sweep_grid(config, grid)
    writable_folder(out)
    records, source = questions_and_model(model, dataset, rows, seed, threads, "the sweep")
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
    console.print(sweep_table(results, title))
    paths = save_sweep(results, out, title=title)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']} and {paths['time_plot']}")
