"""Tuning with a method active (issue 12): the loss of a step under VTW against decoder layers run by hand, where
the gradients go, the adapter round trip, the shipped withdrawal-tuned variant, and the errors users can cause."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import needs_default_model_parts
from reference import record_layer_inputs, withdrawn_logits
from torch.nn import functional as F

from vtexit import VTWConfig
from vtexit.testing.tiny_models import build_tiny
from vtexit.training import ConfigSampler, LoraSettings, load_lora, merge_lora, save_lora, tune, vtw_sampler
from vtexit.training.lora import add_lora, lora_parameters
from vtexit.training.tune import step_loss, trainable_lora

ANSWER = 2  # the last ANSWER tokens of each row are the answer


def _tiny():
    torch.manual_seed(0)
    return build_tiny("llava", num_layers=4)


def _batch(case):
    inputs = case.inputs([1, 0, 2], text_len=[5, 9, 6])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -ANSWER:] = inputs["input_ids"][:, -ANSWER:]  # left padded: every row ends in its answer
    return inputs, labels


def _random_lora(model, seed: int = 1) -> None:
    """peft starts B at zero; random factors make the LoRA path count in every comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def _hand_loss(model, case, inputs, labels, layer: int) -> torch.Tensor:
    """Layers < K on the full sequence, layers >= K on each row's kept (non-visual, non-pad) positions, by hand;
    cross-entropy on the answer tokens, each predicted from the position before it."""
    seen = record_layer_inputs(model, inputs)
    media = case.media_mask(inputs)
    total, count = torch.zeros(()), 0
    for b in range(labels.shape[0]):
        kept = torch.nonzero(inputs["attention_mask"][b].bool() & ~media[b]).flatten()
        logits = withdrawn_logits(model, seen, b, kept, layer)
        for slot, p in enumerate(kept.tolist()):
            if p + 1 < labels.shape[1] and labels[b, p + 1] != -100:
                total += F.cross_entropy(logits[slot : slot + 1].float(), labels[b, p + 1 : p + 2], reduction="sum")
                count += 1
    assert count == ANSWER * labels.shape[0]
    return total / count


@pytest.mark.parametrize("wrap", ["inject", "peft_model"])
@pytest.mark.parametrize("layer", [1, 3])
def test_step_loss_under_vtw_equals_layers_run_by_hand(wrap, layer):
    case = _tiny()
    inputs, labels = _batch(case)
    if wrap == "inject":
        model = case.model
        add_lora(model, LoraSettings(r=4, alpha=8))
    else:  # a peft PeftModel wrapping the whole LLaVA: vtexit patches the transformers model inside it
        from peft import LoraConfig, get_peft_model

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(case.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _random_lora(model)
    with torch.no_grad():
        loss = step_loss(model, {**inputs, "labels": labels}, VTWConfig(layer=layer))
    expected = _hand_loss(case.model, case, inputs, labels, layer)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the withdrawal changes the loss (so the comparison above can fail)
        unpatched = model(**inputs, labels=labels).loss
    assert not torch.allclose(unpatched, expected)


def test_gradients_reach_only_the_lora_factors():
    case = _tiny()
    inputs, labels = _batch(case)
    model = case.model
    params = trainable_lora(model, LoraSettings(r=4, alpha=8))
    _random_lora(model)
    step_loss(model, {**inputs, "labels": labels}, VTWConfig(layer=2)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
    assert with_grad == lora_names and len(params) == len(lora_names) > 0
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in lora_names)
    assert all(".language_model." in n for n in lora_names)


def test_tune_changes_only_lora_is_seeded_and_logs(tmp_path):
    case = _tiny()
    inputs, labels = _batch(case)
    batch = {**inputs, "labels": labels}
    runs = []
    for name in ("a", "b"):
        model = copy.deepcopy(case.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        sampler = vtw_sampler([1, 2, 3], full=0.25)
        result = tune(model, iter([batch] * 6), sampler, steps=6, lr=1e-2, seed=3, progress=False,
                      lora=LoraSettings(r=4, alpha=8), log=tmp_path / f"{name}.jsonl")  # fmt: skip
        after = dict(model.named_parameters())
        for n, value in before.items():  # every original weight is bit for bit what it was (peft renames wrapped ones)
            wrapped = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(value, after[n if n in after else wrapped]), n
        changed = [n for n in after if "lora_" in n]
        assert any(float(after[n].detach().abs().sum()) > 0 for n in changed if "lora_B" in n)  # B starts at zero
        runs.append((result, {n: after[n].detach().clone() for n in changed}))
    (first, lora_a), (second, lora_b) = runs
    assert first.configs == second.configs and first.losses == second.losses
    assert all(torch.equal(lora_a[n], lora_b[n]) for n in lora_a)
    drawn = {c["layer"] if c else None for c in first.configs}
    assert drawn <= {1, 2, 3, None}
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == [round(v, 5) for v in first.losses]
    assert first.losses[-1] < first.losses[0]


def test_adapter_round_trip_gives_identical_logits(tmp_path):
    case = _tiny()
    inputs, _ = _batch(case)
    base = copy.deepcopy(case.model)
    model = case.model
    add_lora(model, LoraSettings(r=4, alpha=8))
    _random_lora(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    path = save_lora(model, tmp_path / "adapter.safetensors", dtype=torch.float32)
    loaded = copy.deepcopy(base)
    load_lora(loaded, path)
    merged = copy.deepcopy(base)
    merge_lora(merged, path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)  # unmerged: bit for bit
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)  # merged: rounding only
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)


def test_bad_arguments_are_value_errors():
    case = _tiny()
    with pytest.raises(ValueError, match="full"):
        vtw_sampler([2, 3], full=1.0)
    with pytest.raises(ValueError, match="layers"):
        vtw_sampler([])
    with pytest.raises(ValueError, match="weights"):
        ConfigSampler((VTWConfig(layer=2),), weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="choices"):
        ConfigSampler(("vtw",))
    with pytest.raises(ValueError, match="rank r"):
        LoraSettings(r=0)
    for kwargs, name in [
        ({"steps": 0}, "steps"),
        ({"steps": 2, "lr": 0.0}, "lr"),
        ({"steps": 2, "warmup": 1.0}, "warmup"),
    ]:
        with pytest.raises(ValueError, match=name):
            tune(case.model, iter([]), vtw_sampler([2]), progress=False, **kwargs)
    with pytest.raises(ValueError, match="layer must be"):  # the config's own check, before any forward
        inputs, labels = _batch(case)
        step_loss(case.model, {**inputs, "labels": labels}, VTWConfig(layer=9))
    with pytest.raises(ValueError, match="labels"):
        step_loss(case.model, _batch(case)[0], VTWConfig(layer=2))
    from vtexit.default_model import load_default

    with pytest.raises(ValueError, match=r"variant must be one of \['default', 'withdrawal-tuned'\]"):
        load_default(variant="tuned")


# --- the shipped withdrawal-tuned variant of the default model -------------------------------------------------



@pytest.fixture(scope="module")
def default_inputs():
    from PIL import Image

    from vtexit.default_model import build_prompt, load_default

    torch.set_num_threads(1)
    model, processor = load_default()
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    inputs = processor(images=image, text=build_prompt("what color is the shape?"), return_tensors="pt")
    return model, inputs


@needs_default_model_parts
def test_withdrawal_tuned_variant_loads_offline_and_round_trips(default_inputs, tmp_path, monkeypatch):
    from vtexit.default_model import load_default
    from vtexit.default_model.loader import TUNED_ADAPTER_FILE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    default, inputs = default_inputs
    tuned, _ = load_default(variant="withdrawal-tuned")
    with torch.no_grad():
        tuned_logits = tuned(**inputs).logits
        assert not torch.allclose(tuned_logits, default(**inputs).logits, atol=1e-3)
    # the factors of the shipped file, loaded unmerged and saved again, are the same file contents
    unmerged = copy.deepcopy(default)
    load_lora(unmerged, TUNED_ADAPTER_FILE)
    resaved = save_lora(unmerged, tmp_path / "again.safetensors", dtype=torch.float16)
    from safetensors.torch import load_file

    original, again = load_file(str(TUNED_ADAPTER_FILE)), load_file(str(resaved))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    reloaded = copy.deepcopy(default)
    merge_lora(reloaded, resaved)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, tuned_logits)  # identical logits across the round trip
        torch.testing.assert_close(unmerged(**inputs).logits, tuned_logits, rtol=1e-4, atol=1e-4)


# --- vtexit tune ------------------------------------------------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from vtexit.app.cli import app

    return CliRunner().invoke(app, ["tune", *args])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--layers", "ten"], "layers must be a range"),
        (["--full", "1.5"], "full must be in [0, 1)"),
        (["--config", '{"method": "vtw"}'], "layer"),
        (["--config", "fastv:keep=0.5"], "missing required setting 'layer' for method 'fastv'"),
        (["--lora-alpha", "0"], "lora alpha must be > 0"),
    ],
)
def test_tune_cli_refuses_bad_settings_before_any_work(args, words, tmp_path):
    result = _cli(*args, "--work-dir", str(tmp_path / "w"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert words in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "w").exists()


@needs_default_model_parts
def test_tune_cli_runs_on_the_default_model_out_of_the_box(tmp_path):
    out = tmp_path / "adapter.safetensors"
    args = ["--steps", "2", "--train-images", "4", "--batch-size", "2", "--turns", "1", "--layers", "4-6"]
    result = _cli(*args, "--out", str(out), "--work-dir", str(tmp_path / "w"), "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "w" / "loss_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all(line["config"] is None or 4 <= line["config"]["layer"] <= 6 for line in lines)
    from vtexit.default_model.adapter import adapter_metadata

    meta = adapter_metadata(out)
    assert meta["steps"] == "2" and meta["seed"] == "0" and meta["storage"] == "float16"
