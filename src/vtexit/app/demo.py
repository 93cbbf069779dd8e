"""``vtexit demo``: calibrate K on the default model, evaluate baseline vs VTW, and draw the analysis plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vtexit.app.model_sources import load_source
from vtexit.evaluation.analysis import GROUPS, accuracy_against_k, attention_by_group
from vtexit.evaluation.evaluate import Answer, EvalResult, evaluate_interleaved, save_results
from vtexit.evaluation.plots import plot_accuracy_against_k, plot_attention_groups, plot_kl
from vtexit.evaluation.report import kl_table, results_table
from vtexit.methods.vtw import valid_layer_range, withdraw
from vtexit.methods.vtw.calibrate import DEFAULT_ETA, CalibrationResult, calibrate


@dataclass
class DemoSettings:
    eta: float = DEFAULT_ETA
    calibration_rows: int = 32
    test_rows: int = 200
    sweep_rows: int = 64
    sweep_step: int = 4
    attention_rows: int = 8
    dyvte: bool = True  # also evaluate DyVTE with the shipped gates (one more pass over the test questions)
    tuned: bool = True  # also the withdrawal-tuned variant: calibrated, unpatched and at its K (two more passes)
    batch_size: int = 8
    seed: int = 0
    out: Path = Path("out/demo")


def _accuracy_and_flops(answers: list[Answer]) -> tuple[float, float]:
    """Exact-match accuracy and mean prefill FLOPs of some answers."""
    return sum(a.correct for a in answers) / len(answers), sum(a.prefill_flops for a in answers) / len(answers)


def run_demo(settings: DemoSettings, console: Console | None = None) -> tuple[CalibrationResult, list[EvalResult]]:
    console = console or Console()
    from vtexit.evaluation.datasets import EasyVQA
    from vtexit.evaluation.datasets.select import fixed_subset

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    with console.status("loading the default model (the first run converts the packaged weights, ~1 min)"):
        source = load_source("default")
    model, processor, build_prompt = source.model, source.processor, source.prompt
    console.print(f"model: {source.name}, {model.config.text_config.num_hidden_layers} decoder layers")

    batches = source.make_batches(settings.calibration_rows, settings.batch_size, "train", settings.seed)
    calibration = calibrate(model, batches, eta=settings.eta)
    console.print(kl_table(calibration))
    calibration.to_json(out / "kl.json")
    plot_kl(calibration, out / "kl_curve.png")

    records = fixed_subset(EasyVQA("test"), settings.test_rows, seed=settings.seed)
    k = calibration.layer
    # Interleaved batch by batch, so that load on a shared machine falls on both configurations alike.
    baseline, vtw = evaluate_interleaved(
        model,
        processor,
        records,
        build_prompt,
        {"baseline": None, f"VTW K={k} (calibrated)": lambda m: withdraw(m, layer=k)},
        batch_size=settings.batch_size,
    )

    # The sweep runs on a prefix of `records`, so the baseline and the calibrated K are read off the runs above.
    low, n = valid_layer_range(model)
    sweep_records = records[: settings.sweep_rows]
    others = [k_ for k_ in range(low, n, settings.sweep_step) if k_ != k]
    sweep_runs = accuracy_against_k(
        model, processor, sweep_records, build_prompt, others, batch_size=settings.batch_size
    )
    sweep_answers = {k_: r.answers for k_, r in sweep_runs.items()}
    sweep_answers[k] = vtw.answers[: len(sweep_records)]
    base_accuracy, base_flops = _accuracy_and_flops(baseline.answers[: len(sweep_records)])
    accuracy, saved = {}, {}
    for k_ in sorted(sweep_answers):
        accuracy[k_], flops = _accuracy_and_flops(sweep_answers[k_])
        saved[k_] = 1 - flops / base_flops
    plot_accuracy_against_k(accuracy, saved, base_accuracy, out / "accuracy_vs_k.png", chosen=k)
    shares = attention_by_group(model, processor, records[: settings.attention_rows], build_prompt)
    plot_attention_groups(shares, GROUPS, out / "attention_groups.png")
    (out / "attention_groups.json").write_text(
        json.dumps({"groups": list(GROUPS), "share_per_layer": shares.round(5).tolist()}, indent=1)
    )

    results = [baseline, vtw]
    save_results([*results, *sweep_runs.values()], out / "results.json")
    console.print(results_table(results, baseline, dataset="easy-vqa test"))
    sweep_table = Table(title=f"accuracy against K ({len(sweep_records)} questions)")
    sweep_table.add_column("K", justify="right")
    sweep_table.add_column("accuracy", justify="right")
    sweep_table.add_column("FLOPs saved", justify="right")
    for k_ in accuracy:
        sweep_table.add_row(str(k_), f"{100 * accuracy[k_]:.1f}%", f"{100 * saved[k_]:.0f}%")
    sweep_table.add_row(str(n), f"{100 * base_accuracy:.1f}%", "0%", style="dim")
    console.print(sweep_table)
    if settings.dyvte:
        from vtexit.app.demo_dyvte import run_dyvte_demo

        sweep = {k_: (saved[k_], accuracy[k_]) for k_ in accuracy}
        run_dyvte_demo(
            model, processor, records, build_prompt, baseline, vtw, k, sweep, len(sweep_records), out, console,
            batch_size=settings.batch_size,
        )
    if settings.tuned:
        from vtexit.app.demo_tuned import run_tuned_demo

        run_tuned_demo(
            calibration, baseline, vtw, settings.calibration_rows, records, out, console,
            batch_size=settings.batch_size, seed=settings.seed,
        )  # fmt: skip
    console.print(
        f"wrote {out}/: kl.json, results.json, attention_groups.json, "
        "kl_curve.png, accuracy_vs_k.png, attention_groups.png"
    )
    return calibration, results
