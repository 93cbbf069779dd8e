"""The DyVTE gates shipped for the default model: small, recorded, and exact on the real model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_default_model_parts

import vtexit
from vtexit.default_model.gates import GATES_DIR, load_default_gates


def test_shipped_gates_are_small_recorded_and_sized_to_the_default_model():
    size = sum(p.stat().st_size for p in GATES_DIR.iterdir())
    assert size < 6 * 2**20, f"{size / 2**20:.1f} MiB"
    gates = load_default_gates()
    assert (gates.config.hidden_size, gates.config.num_layers) == (576, 30)  # SmolLM2-135M: d = 576, 30 layers
    assert 0.0 < gates.config.threshold < 1.0
    info = json.loads((GATES_DIR / "training.json").read_text())
    assert info["layers"] == list(gates.layers) and info["training"]["seed"] == 0
    assert (GATES_DIR / "TRAINING.md").is_file()
    assert vtexit.config_from_dict({"method": "dyvte"}) == vtexit.DyVTEConfig("default", None)


@pytest.fixture(scope="module")
def default_model():
    torch.set_num_threads(1)
    from vtexit.default_model import build_prompt, load_default
    from vtexit.evaluation.batches import processor_batch
    from vtexit.evaluation.datasets import EasyVQA
    from vtexit.evaluation.datasets.select import fixed_subset

    model, processor = load_default()
    records = fixed_subset(EasyVQA("test"), 4, seed=7)  # exits 16, 28, 26, 16 with the shipped gates
    return model, dict(processor_batch(processor, records, build_prompt)), processor, records


@needs_default_model_parts
@torch.no_grad()
def test_each_row_of_a_batch_equals_the_row_under_vtw_at_its_exit_layer(default_model):
    model, inputs, _, _ = default_model
    with vtexit.apply(model, vtexit.DyVTEConfig()) as handle:  # "default" gates at their saved threshold
        logits = model(**inputs).logits
        layout = handle.last_layout
        exits = handle.exit_layers
    assert len(set(exits)) > 1, exits  # rows of one batch leave at different layers
    for layer in sorted(set(exits)):
        with vtexit.withdraw(model, layer=layer) as vtw:
            reference = model(**inputs).logits
            reference_layout = vtw.last_layout
        for b in [b for b, k in enumerate(exits) if k == layer]:
            got = logits[b][layout.valid[b]]
            expected = reference[b][reference_layout.valid[b]]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"row {b} exit {layer}")


@needs_default_model_parts
def test_demo_part_reports_the_exits_the_patch_reports(default_model, tmp_path):
    from rich.console import Console

    from vtexit.app.demo_dyvte import run_dyvte_demo
    from vtexit.default_model import build_prompt
    from vtexit.evaluation.evaluate import evaluate

    model, inputs, processor, records = default_model
    with vtexit.dyvte(model) as handle, torch.no_grad():
        model(**inputs)
        exits = handle.exit_layers
    baseline = evaluate(model, processor, records, build_prompt, batch_size=4, progress=False)
    vtw = evaluate(
        model,
        processor,
        records,
        build_prompt,
        method=lambda m: vtexit.withdraw(m, layer=24),
        name="VTW K=24",
        batch_size=4,
        progress=False,
    )
    console = Console(record=True, width=200)
    result = run_dyvte_demo(
        model,
        processor,
        records,
        build_prompt,
        baseline,
        vtw,
        24,
        {24: (0.16, 1.0)},
        4,
        tmp_path,
        console,
        batch_size=4,
    )
    saved = json.loads((tmp_path / "dyvte.json").read_text())
    assert saved["exit_layers"] == exits and saved["threshold"] == load_default_gates().config.threshold
    assert result.prefill_flops_per_sample < baseline.prefill_flops_per_sample
    assert (tmp_path / "pareto.png").stat().st_size > 0 and "DyVTE" in console.export_text()
