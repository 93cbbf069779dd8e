"""The sweep: grids checked against the model before any work, points that equal separate runs, the table, the
Pareto front and plot, and the ``vtexit sweep`` command."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import needs_default_model_parts
from PIL import Image
from typer.testing import CliRunner

import vtexit
from vtexit.app.cli import app
from vtexit.core.flops import DecoderShape, count
from vtexit.evaluation.evaluate import normalise_answer
from vtexit.evaluation.plots import ParetoPoint, pareto_front
from vtexit.evaluation.sweep import COLUMNS, default_grid, pareto_points, resolve_grid, run_sweep, save_sweep
from vtexit.testing.tiny_models import build_tiny


@pytest.mark.parametrize("family, layers", [("llava", 4), ("llava", 9), ("llava", 32), ("qwen3_vl", 4)])
def test_default_grid_is_valid_for_models_of_any_depth(family, layers):
    model = build_tiny(family, num_layers=layers).model if family == "llava" else build_tiny(family).model
    grid = default_grid(model)
    entries = resolve_grid(model, grid)  # raises if any point does not fit the model
    assert entries[0].config is None and entries[0].label == "baseline"
    assert [e.method for e in entries].count("none") == 1
    pre_llm = {"divprune", "pool", "visionzip"}  # before the language model: on every family
    assert {e.method for e in entries} == {"none", "vtw", "fastv", "pdrop", "random_drop", "dart"} | pre_llm
    assert len({e.label for e in entries}) == len(entries)
    if layers == 32:  # PyramidDrop's paper stages on a 32-layer LLaVA
        assert {tuple(e.config.layers) for e in entries if e.method == "pdrop"} == {(8, 16, 24)}


def test_bad_points_are_refused_by_name_before_any_work():
    model = build_tiny("llava", num_layers=4).model
    cases = [
        ([{"method": "nope"}], "method must be one of"),
        ([{"method": "fastv", "layer": 2, "keep": 2}], "keep"),
        ([{"method": "vtw", "layer": 9}], "layer"),
        ([{"method": "pdrop", "layers": [3, 2]}], "layers"),
        ([{"method": "fastv", "layer": 2, "keep": 0.5}, {"method": "fastv", "layer": 2, "keep": 0.5}], "repeated"),
        (["fastv"], "config dict"),
    ]
    for grid, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve_grid(model, grid)
    assert getattr(model, "_vtexit_engine", None) is None
    entries = resolve_grid(
        model,
        [{"method": "none"}, {"method": "vtw", "layer": 2, "label": "VTW at 2"}, vtexit.FastVConfig(layer=1, keep=0.5)],
    )
    assert [e.label for e in entries] == ["baseline", "VTW at 2", "fastv layer=1 keep=0.5"]
    renumbered = resolve_grid(
        model, [{"method": "pdrop", "layers": [1, 3]}, {"method": "pdrop", "layers": "1,3", "renumber": True}]
    )
    assert [e.label for e in renumbered[1:]] == ["pdrop layers=1/3 keep=0.5", "pdrop layers=1/3 keep=0.5 renumber=True"]
    assert entries[1].config == vtexit.VTWConfig(layer=2)


def test_pareto_front_holds_exactly_the_points_nobody_beats():
    rng = random.Random(0)
    points = [
        ParetoPoint("m", f"p{i}", rng.choice([0, 0.1, 0.2, 0.5, 0.7]), rng.choice([0.5, 0.8, 0.9, 1.0]))
        for i in range(30)
    ]
    front = pareto_front(points)
    for p in points:
        beaten = any(
            q.flops_saved >= p.flops_saved
            and q.accuracy >= p.accuracy
            and (q.flops_saved > p.flops_saved or q.accuracy > p.accuracy)
            for q in points
        )
        assert (p in front) != beaten, p
    assert [p.flops_saved for p in front] == sorted(p.flops_saved for p in front)


@pytest.fixture(scope="module")
def default():
    torch.set_num_threads(2)
    from vtexit.default_model import build_prompt, load_default
    from vtexit.evaluation.datasets import EasyVQA
    from vtexit.evaluation.datasets.select import fixed_subset

    model, processor = load_default()
    return model, processor, build_prompt, fixed_subset(EasyVQA("test"), 4, seed=5)


@torch.no_grad()
def _by_hand(model, processor, prompt, records, verb):
    """Answers and prompt lengths from the processor and generate called directly on one batch."""
    images = [Image.open(r.image_path).convert("RGB") for r in records]
    inputs = processor(
        images=images,
        text=[prompt(r.question) for r in records],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    if verb is None:
        out = model.generate(**inputs, **kwargs)
    else:
        with verb(model):
            out = model.generate(**inputs, **kwargs)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [normalise_answer(t) for t in texts], inputs["attention_mask"].sum(1).tolist()


@needs_default_model_parts
def test_sweep_points_equal_separate_runs_and_are_saved(default, tmp_path):
    from vtexit.default_model import NUM_IMAGE_TOKENS

    model, processor, prompt, records = default
    grid = [
        {"method": "fastv", "layer": 2, "keep": 0.25},
        {"method": "random_drop", "layer": 3, "keep": 0.5},
        {"method": "divprune", "keep": 0.25},
    ]
    points = run_sweep(model, processor, records, prompt, grid, batch_size=4, warmup_batches=0, progress=False)
    assert [p.entry.label for p in points] == [
        "baseline",
        "fastv layer=2 keep=0.25",
        "random_drop layer=3 keep=0.5 seed=0",
        "divprune keep=0.25",
    ]
    verbs = [
        None,
        lambda m: vtexit.fastv(m, layer=2, keep=0.25),
        lambda m: vtexit.random_drop(m, layer=3, keep=0.5),
        lambda m: vtexit.divprune(m, keep=0.25),
    ]
    shape = DecoderShape.from_model(model)
    n = shape.num_layers
    kept_visual = [NUM_IMAGE_TOKENS, 16, 32, 16]  # round half up of keep x 64
    first = [n, 2, 3, 0]  # DivPrune: every layer sees the shorter prompt
    flops = []
    for point, verb, visual, layer in zip(points, verbs, kept_visual, first, strict=True):
        answers, lengths = _by_hand(model, processor, prompt, records, verb)
        assert [a.prediction for a in point.result.answers] == answers, point.entry.label
        expected = [count(shape, [p] * layer + [p - NUM_IMAGE_TOKENS + visual] * (n - layer)).prefill for p in lengths]
        assert [a.prefill_flops for a in point.result.answers] == expected, point.entry.label
        flops.append(sum(expected) / len(expected))
    for point, mean in zip(points, flops, strict=True):
        assert point.flops_saved == pytest.approx(1 - mean / flops[0])

    paths = save_sweep(points, tmp_path, title="test")
    saved = json.loads(paths["json"].read_text())
    assert [vtexit.config_from_dict(p["config"]) for p in saved[1:]] == [p.entry.config for p in points[1:]]
    assert saved[0]["config"] == {"method": "none"}
    lines = paths["markdown"].read_text().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and len(lines) == 2 + len(points)
    assert lines[3].startswith("| fastv layer=2 keep=0.25 | ") and "100%" not in lines[2].split("|")[5]
    assert paths["plot"].stat().st_size > 10_000 and paths["time_plot"].stat().st_size > 10_000
    base = points[0].result.lm_prefill_s_per_sample
    by_time = [1 - p.result.lm_prefill_s_per_sample / base for p in points]
    assert [p.flops_saved for p in pareto_points(points, "time")] == pytest.approx(by_time)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_refuses_a_bad_point_before_loading_anything(tmp_path):
    result = _invoke("sweep", "--config", "{method: vtw}", "--out", str(tmp_path), "--model", "/nonexistent")
    assert result.exit_code == 2 and "--config" in result.output and "not valid JSON" in result.output
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"method": "vtw"}))
    result = _invoke("sweep", "--grid", str(grid), "--out", str(tmp_path), "--model", "/nonexistent")
    assert result.exit_code == 2 and "--grid" in result.output and "JSON list" in " ".join(result.output.split())


@needs_default_model_parts
def test_cli_sweep_runs_on_the_default_model_and_checks_settings_first(tmp_path):
    bad = _invoke("sweep", "--config", '{"method": "fastv", "layer": 2, "keep": 2}', "--out", str(tmp_path))
    assert bad.exit_code == 2 and "keep must be in (0, 1]" in " ".join(bad.output.split())
    assert not (tmp_path / "sweep.json").exists()
    point = '{"method": "pdrop", "layers": [4, 8], "keep": 0.5, "label": "pdrop 4/8"}'
    result = _invoke("sweep", "--rows", "2", "--batch-size", "2", "--config", point, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "pdrop 4/8" in result.output and "baseline" in result.output
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["label"] for p in saved] == ["baseline", "pdrop 4/8"] and saved[1]["result"]["n"] == 2
    assert (tmp_path / "pareto.png").exists() and (tmp_path / "sweep.md").exists()
