"""The evaluation runner, the analysis and the demo on the real-weights default model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import needs_default_model_parts
from PIL import Image

import vtexit
from vtexit.core.flops import DecoderShape, count, withdrawal_tokens
from vtexit.default_model import NUM_IMAGE_TOKENS
from vtexit.evaluation.analysis import GROUPS, attention_by_group
from vtexit.evaluation.batches import processor_batch
from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.evaluate import evaluate, evaluate_interleaved, normalise_answer

pytestmark = needs_default_model_parts


@pytest.fixture(scope="module")
def default():
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
    times = (base.generate_s_per_sample, vtw.lm_prefill_s_per_sample, vtw.generate_s_per_sample)
    assert all(math.isfinite(t) for t in times)  # reported, not judged (benchmarks compare timings)


@torch.no_grad()
def _answers_by_hand(model, processor, prompt, records, batch_size: int, layer: int | None) -> list[str]:
    """First words of greedy answers: the processor and generate called directly, in the same batches."""
    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.open(r.image_path).convert("RGB") for r in chunk]
        inputs = processor(
            images=images,
            text=[prompt(r.question) for r in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        if layer is None:
            out = model.generate(**inputs, **kwargs)
        else:
            with vtexit.withdraw(model, layer=layer):
                out = model.generate(**inputs, **kwargs)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        predictions += [normalise_answer(t) for t in texts]
    return predictions


def test_interleaved_runs_give_the_answers_and_flops_of_separate_runs_in_rotating_order(default, records):
    model, processor, prompt = default
    low, n = vtexit.valid_layer_range(model)
    calls: list[str] = []

    def vtw(k: int, name: str):
        def method(m):
            calls.append(name)
            return vtexit.withdraw(m, layer=k)

        return method

    methods = {"baseline": None, "K=4": vtw(4, "K=4"), "K=N": vtw(n, "K=N")}
    base, k4, kn = evaluate_interleaved(
        model, processor, records, prompt, methods, batch_size=3, warmup_batches=1, progress=False
    )
    assert [r.name for r in (base, k4, kn)] == list(methods)
    # An untimed warm-up batch for each, then 3 batches (3, 3, 2 rows) in rotating order:
    # (base, K=4, K=N), (K=4, K=N, base), (K=N, base, K=4).
    assert calls == ["K=4", "K=N"] + ["K=4", "K=N", "K=4", "K=N", "K=N", "K=4"]
    by_hand = {k: _answers_by_hand(model, processor, prompt, records, 3, k) for k in (None, 4)}
    assert [a.prediction for a in base.answers] == by_hand[None] == [a.prediction for a in kn.answers]
    assert [a.prediction for a in k4.answers] == by_hand[4]
    assert base.accuracy == sum(p == r.answer for p, r in zip(by_hand[None], records, strict=True)) / len(records)
    shape = DecoderShape.from_model(model)
    lengths = _prompt_lengths(processor, prompt, records)
    for result, k in ((base, n), (k4, 4), (kn, n)):
        expected = [count(shape, withdrawal_tokens(n, p, NUM_IMAGE_TOKENS, k)).prefill for p in lengths]
        assert [a.prefill_flops for a in result.answers] == expected, result.name
    for result in (base, k4, kn):
        assert math.isfinite(result.lm_prefill_s_per_sample) and math.isfinite(result.generate_s_per_sample)


def test_runner_on_a_static_cache_answers_as_generate_on_the_dynamic_one(default, records):
    """``cache_implementation="static"``: the answers of generate called by hand on the default cache, and the decode
    steps really ran on the static cache: there every step attends over all slots of its buffers (prompt plus every
    new token), on the dynamic cache only over those written so far, so a static decode step counts more FLOPs."""
    model, processor, prompt = default
    methods = {"baseline": None, "K=4": lambda m: vtexit.withdraw(m, layer=4)}
    run = dict(batch_size=4, warmup_batches=0, progress=False)
    base, k4 = evaluate_interleaved(model, processor, records, prompt, methods, cache_implementation="static", **run)
    assert [a.prediction for a in base.answers] == _answers_by_hand(model, processor, prompt, records, 4, None)
    assert [a.prediction for a in k4.answers] == _answers_by_hand(model, processor, prompt, records, 4, 4)
    dynamic = evaluate(model, processor, records, prompt, method=methods["K=4"], **run)
    assert [a.prediction for a in dynamic.answers] == [a.prediction for a in k4.answers]
    assert k4.decode_flops_per_token > dynamic.decode_flops_per_token > 0
    assert [r.cache_implementation for r in (base, k4, dynamic)] == ["static", "static", "dynamic"]
    with pytest.raises(ValueError, match=r"cache_implementation must be one of \['dynamic', 'static'\]"):
        evaluate(model, processor, records, prompt, cache_implementation="paged")


def test_processor_batch_pads_left_without_changing_the_tokenizer(default, records):
    from vtexit.app.model_sources import _vqa_batches

    model, processor, prompt = default
    tokenizer = processor.tokenizer
    previous, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        batch = processor_batch(processor, records[:3], prompt)
        made = _vqa_batches(processor, prompt)(3, 3, "test", 0)
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = previous
    rows = []
    for r in records[:3]:  # each row alone: nothing to pad
        image = Image.open(r.image_path).convert("RGB")
        rows.append(processor(images=[image], text=[prompt(r.question)], return_tensors="pt")["input_ids"][0])
    width = max(len(row) for row in rows)
    assert len({len(row) for row in rows}) > 1  # the rows differ in length, so padding is exercised
    for b, row in enumerate(rows):
        assert torch.equal(batch["input_ids"][b, width - len(row) :], row)
        assert batch["attention_mask"][b].tolist() == [0] * (width - len(row)) + [1] * len(row)
    assert made[0]["attention_mask"][:, -1].all()  # left-padded too


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
