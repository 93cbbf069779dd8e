"""DyVTE around the policy: labels against brute force, gate training, saving, configs, host reads, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vtexit
from vtexit.app.cli import app
from vtexit.app.method_spec import parse_method_spec
from vtexit.core.engine import ScheduleEngine
from vtexit.methods.dyvte.gates import DyVTEGates, GatesConfig
from vtexit.methods.dyvte.labels import ANSWER_KEY, ExitLabels, LabelRule, label_batch
from vtexit.methods.dyvte.train import fit_gates, simulate_exits
from vtexit.testing.tiny_models import build_tiny

IMAGES = [1, 0, 2]
TEXT = [5, 9, 3]


@pytest.fixture(scope="module")
def llava():
    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    return case


def _answers(case, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    low, high = case.text_id_range
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=generator) for n in lengths]


@torch.no_grad()
def _brute_force(case, row: dict, answer: torch.Tensor, layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1, per-token loss) at the answer positions of one unpadded row with its answer appended, from a plain
    forward, under VTW at ``layer`` (None: unpatched)."""
    ids = torch.cat([row["input_ids"], answer.unsqueeze(0)], dim=1)
    batch = dict(row, input_ids=ids, attention_mask=torch.ones_like(ids))
    scored = list(range(row["input_ids"].shape[1] - 1, ids.shape[1] - 1))  # positions predicting the answer
    if layer is None:
        logits = case.model(**batch).logits[0, scored]
    else:
        with vtexit.withdraw(case.model, layer=layer) as handle:
            logits = case.model(**batch).logits[0]
            index = handle.last_layout.index[0][handle.last_layout.valid[0]].tolist()
        logits = logits[[index.index(p) for p in scored]]
    logp = logits.float().log_softmax(-1)
    return logp.argmax(-1), -logp.gather(1, answer.unsqueeze(1)).squeeze(1)


def test_labels_match_brute_force_forwards_per_row(llava):
    inputs = llava.inputs(IMAGES, text_len=TEXT)
    rows = llava.row_inputs(IMAGES, text_len=TEXT)
    answers = _answers(llava, [3, 1, 2])
    engine = ScheduleEngine(llava.model, None)
    labels = label_batch(llava.model, dict(inputs, **{ANSWER_KEY: answers}), [1, 2, 3], engine=engine)
    with_images = [b for b, n in enumerate(IMAGES) if n]
    assert labels.rows == len(with_images)  # the row without images is not a training row
    for i, b in enumerate(with_images):
        top1, loss = _brute_force(llava, rows[b], answers[b], None)
        for j, k in enumerate(labels.layers):
            exited_top1, exited_loss = _brute_force(llava, rows[b], answers[b], k)
            agreement = float((exited_top1 == top1).float().mean())
            ratio = float(exited_loss.mean() / loss.mean())
            assert labels.agreement[i, j] == pytest.approx(agreement), (b, k)
            assert labels.loss_ratio[i, j] == pytest.approx(ratio, rel=1e-4), (b, k)
            assert bool(labels.safe[i, j]) == (agreement >= 1.0 and ratio <= 1.03)
    loose = labels.with_rule(LabelRule(min_agreement=0.0, loss_ratio=1e9))
    assert bool(loose.safe.all()) and not bool(labels.safe.all())  # the rule, not the data, decides


def test_label_features_are_the_gate_input_by_hand(llava):
    from reference import record_layer_inputs
    from test_dyvte_families import hand_features

    inputs = llava.inputs(IMAGES, text_len=TEXT)
    answers = _answers(llava, [2, 2, 2])
    engine = ScheduleEngine(llava.model, None)
    labels = label_batch(llava.model, dict(inputs, **{ANSWER_KEY: answers}), [1, 3], engine=engine)
    seen = record_layer_inputs(llava.model, inputs)  # the prompt alone: answers come after, causal attention
    media = llava.media_mask(inputs) & inputs["attention_mask"].bool()
    for j, k in enumerate(labels.layers):
        expected = hand_features(seen, k, inputs, media)[media.any(1)]
        torch.testing.assert_close(labels.features[:, j], expected, atol=1e-5, rtol=1e-4)


def test_greedy_labels_score_the_models_own_answer(llava):
    inputs = llava.inputs([1, 2], text_len=[4, 6], seed=3)
    media_ids = sorted(llava.media_token_ids)
    generated = llava.model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=media_ids)
    engine = ScheduleEngine(llava.model, None)
    greedy = label_batch(llava.model, inputs, [1, 2], engine=engine, max_new_tokens=2)
    given = label_batch(llava.model, dict(inputs, **{ANSWER_KEY: list(generated[:, -2:])}), [1, 2], engine=engine)
    torch.testing.assert_close(greedy.loss_ratio, given.loss_ratio)
    torch.testing.assert_close(greedy.full_loss, given.full_loss)


def _synthetic_labels(rows: int = 400, layers=(1, 2, 3), seed: int = 0) -> ExitLabels:
    """Features whose first dimension decides whether exiting is safe (later layers: safe more often)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, len(layers), 8, generator=generator)
    offsets = torch.tensor([-0.8, 0.0, 0.8])[: len(layers)]
    safe = features[:, :, 0] + offsets > 0
    return ExitLabels(
        layers=tuple(layers),
        num_layers=4,
        features=features,
        agreement=safe.float(),
        loss_ratio=torch.ones(rows, len(layers)),
        full_loss=torch.ones(rows),
    )


def test_fitted_gates_learn_a_separable_rule_and_simulate_like_by_hand():
    labels = _synthetic_labels(800)
    gates = DyVTEGates(GatesConfig(hidden_size=4, num_layers=4, layers=(1, 2, 3), gate_size=16))
    record = fit_gates(gates, labels, steps=300, lr=3e-3, validation=0.25, progress=False)
    assert min(record.validation_accuracy.values()) > 0.9
    assert record.loss_log[-1][1] < record.loss_log[0][1]
    assert record.safe_rate[1] < record.safe_rate[2] < record.safe_rate[3]
    exits, kept = simulate_exits(gates, labels, 0.5)
    for r in range(labels.rows):  # by hand: the first layer whose gate says exit, else N
        fired = [k for j, k in enumerate(labels.layers) if gates(k, labels.features[r : r + 1, j]).argmax() == 1]
        layer = fired[0] if fired else 4
        assert int(exits[r]) == layer
        assert bool(kept[r]) == (layer == 4 or bool(labels.agreement[r, labels.layers.index(layer)] == 1))


def test_gates_round_trip_through_a_folder(llava, tmp_path):
    inputs = llava.inputs(IMAGES, text_len=TEXT)
    torch.manual_seed(1)
    gates = vtexit.DyVTEGates.for_model(llava.model)
    with torch.no_grad():
        gates.gates["2"].fc2.bias[1] = 5.0  # some rows exit
    gates.save_pretrained(tmp_path / "gates")
    loaded = vtexit.DyVTEGates.from_pretrained(tmp_path / "gates")
    assert loaded.config == gates.config and loaded.source == str(tmp_path / "gates")
    for name, tensor in gates.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert json.loads((tmp_path / "gates" / "config.json").read_text())["layers"] == [1, 2, 3]
    with vtexit.dyvte(llava.model, gates, threshold=0.5) as handle:
        logits = llava.model(**inputs).logits
        exits = handle.exit_layers
    config = vtexit.config_from_dict({"method": "dyvte", "gates": str(tmp_path / "gates"), "threshold": "0.5"})
    assert config == vtexit.DyVTEConfig(gates=str(tmp_path / "gates"), threshold=0.5)
    assert vtexit.config_from_dict(config.to_dict()) == config
    with vtexit.apply(llava.model, config) as handle:
        assert torch.equal(llava.model(**inputs).logits, logits)
        assert handle.exit_layers == exits and isinstance(handle, vtexit.DyVTEHandle)
    assert 2 in exits and exits[1] == 4  # the row without images never exits


def test_threshold_moves_exits_later(llava):
    inputs = llava.inputs(IMAGES, text_len=TEXT)
    torch.manual_seed(2)
    gates = vtexit.DyVTEGates.for_model(llava.model)
    with torch.no_grad():
        gates.gates["1"].fc2.bias[1] = 100.0  # P(exit) = 1 at layer 1
    with vtexit.dyvte(llava.model, gates, threshold=0.5) as handle:
        llava.model(**inputs)
        assert handle.exit_layers == [1, 4, 1]
    with vtexit.dyvte(llava.model, gates, threshold=1.0) as handle:  # P(exit) > 1 never holds
        llava.model(**inputs)
        assert handle.exit_layers == [4, 4, 4]
    gates.set_default_threshold(1.0)  # saved with the gates, used when a patch gives no threshold
    with vtexit.dyvte(llava.model, gates) as handle:
        llava.model(**inputs)
        assert handle.exit_layers == [4, 4, 4] and handle.threshold == 1.0


@torch.no_grad()
def test_exit_layers_describe_the_last_call_with_images_only(llava):
    torch.manual_seed(4)
    gates = vtexit.DyVTEGates.for_model(llava.model)
    with torch.no_grad():
        gates.gates["1"].fc2.bias[1] = 100.0
    with vtexit.dyvte(llava.model, gates) as handle:
        assert handle.exit_layers is None  # no call yet
        llava.model(**llava.inputs([1, 1], text_len=[4, 5]))
        assert handle.exit_layers == [1, 1]
        llava.model(**llava.inputs([0, 0], text_len=[4, 5]))  # text only: nothing exits, nothing to report
        assert handle.exit_layers is None


def _host_reads(model, inputs) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**inputs)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@torch.no_grad()
def test_host_reads_one_per_gated_layer_until_every_row_has_exited(llava):
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    with vtexit.baseline(llava.model):
        plain = _host_reads(llava.model, inputs)
    torch.manual_seed(3)
    gates = vtexit.DyVTEGates.for_model(llava.model)  # gated layers 1, 2, 3
    with torch.no_grad():
        for k in gates.layers:
            gates.gates[str(k)].fc2.bias[1] = -100.0
    with vtexit.dyvte(llava.model, gates) as handle:
        assert _host_reads(llava.model, inputs) - plain == 3  # nobody exits: one read per gated layer
        assert handle.exit_layers == [4, 4]
    with torch.no_grad():
        gates.gates["1"].fc2.bias[1] = 100.0
    with vtexit.dyvte(llava.model, gates) as handle:
        assert _host_reads(llava.model, inputs) - plain == 2  # the decision and the event at 1, then nothing
        assert handle.exit_layers == [1, 1]


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_threshold_is_refused(llava, threshold):
    gates = vtexit.DyVTEGates.for_model(llava.model)
    with pytest.raises(ValueError, match="threshold must be"):
        vtexit.dyvte(llava.model, gates, threshold=threshold)
    assert getattr(llava.model, "_vtexit_engine", None) is None


def test_gates_of_another_model_and_missing_folders_are_refused(llava, tmp_path):
    other = build_tiny("llava", num_layers=6)
    with pytest.raises(ValueError, match="gates were made for a model"):
        vtexit.dyvte(llava.model, vtexit.DyVTEGates.for_model(other.model))
    with pytest.raises(ValueError, match="gates must be a folder"):
        vtexit.dyvte(llava.model, tmp_path / "nothing")
    with pytest.raises(ValueError, match="gates must be"):
        vtexit.dyvte(llava.model, 3)
    with pytest.raises(ValueError, match="layers must be exit layers"):
        vtexit.DyVTEGates.for_model(llava.model, layers=[0, 2])
    assert getattr(llava.model, "_vtexit_engine", None) is None


def test_train_gates_end_to_end_on_a_tiny_model(llava):
    samples = [llava.inputs([1, 2], text_len=[4, 6], seed=s) for s in range(2)]
    gates = vtexit.train_gates(llava.model, samples, steps=20, progress=False)
    record = gates.training_record
    assert record.rows + record.validation_rows == 4 and record.steps == 20
    assert set(record.safe_rate) == set(gates.layers) == {1, 2, 3}
    with vtexit.dyvte(llava.model, gates) as handle:
        llava.model(**samples[0])
        assert all(k in (1, 2, 3, 4) for k in handle.exit_layers)


def test_method_specs_name_any_method():
    assert parse_method_spec("vtw:layer=3") == vtexit.VTWConfig(layer=3)
    assert parse_method_spec("dyvte:gates=some/folder, threshold=0.7") == vtexit.DyVTEConfig("some/folder", 0.7)
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("dyvte:threshold")
    with pytest.raises(ValueError, match="method must be one of"):
        parse_method_spec("nope")


def test_cli_trains_gates_that_load(tmp_path: Path):
    out = tmp_path / "gates"
    result = CliRunner().invoke(
        app, ["train-gates", "--model", "tiny", "--rows", "4", "--batch-size", "2", "--steps", "5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    gates = vtexit.DyVTEGates.from_pretrained(out)
    info = json.loads((out / "training.json").read_text())
    assert info["layers"] == list(gates.layers) and info["labels"]["rows"] == 4
    bad = CliRunner().invoke(app, ["train-gates", "--model", "tiny", "--answers", "gold", "--out", str(out)])
    assert bad.exit_code == 2 and "--answers" in bad.output


def test_cli_trains_on_a_local_folder_with_dataset_answers_and_evaluates_dyvte_by_name(tmp_path: Path):
    from vtexit.testing.tiny_folder import save_tiny_llava_folder, write_shape_questions

    folder = save_tiny_llava_folder(tmp_path / "tiny")
    questions = write_shape_questions(tmp_path / "data", count=6)
    gates, out = tmp_path / "gates", tmp_path / "eval.json"
    common = ["--model", str(folder), "--dataset", str(questions), "--rows", "6", "--batch-size", "3"]
    trained = CliRunner().invoke(
        app, ["train-gates", *common, "--answers", "dataset", "--steps", "5", "--out", str(gates)]
    )
    assert trained.exit_code == 0, trained.output
    spec = f"dyvte:gates={gates},threshold=0.5"
    evaluated = CliRunner().invoke(app, ["evaluate", *common, "--method", spec, "--out", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    results = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"baseline", spec} and results[spec]["n"] == 6
    assert results[spec]["prefill_flops_per_sample"] <= results["baseline"]["prefill_flops_per_sample"]
    refused = CliRunner().invoke(app, ["evaluate", *common, "--method", "dyvte:threshold=2", "--out", str(out)])
    assert refused.exit_code == 2 and "threshold must be" in " ".join(refused.output.split())
