"""The rest of the engine contract: configs and the method registry, cost records, method-owned modules,
position renumbering, and replacement forwards combined with a schedule in one patch."""

from __future__ import annotations

import json

import pytest
import torch
from reference import record_layer_inputs, scheduled_logits
from torch import nn

import vtexit
from vtexit.testing.tiny_models import build_tiny


# ------------------------------------------------------------------------------------------- configs
@torch.no_grad()
def test_config_round_trips_and_apply_equals_the_short_verb(llava4):
    config = vtexit.VTWConfig(layer=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"method": "vtw", "layer": 2}
    assert vtexit.config_from_dict(data) == config
    assert vtexit.config_from_dict({"method": "vtw", "layer": "2"}) == config  # strings from a CLI
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    with vtexit.apply(llava4.model, config) as handle:
        applied = llava4.model(**inputs).logits
        assert isinstance(handle, vtexit.WithdrawHandle) and handle.layer == 2
    with vtexit.withdraw(llava4.model, layer=2):
        assert torch.equal(llava4.model(**inputs).logits, applied)
    assert set(vtexit.method_configs()) >= {"vtw", "none"}


def test_bad_configs_name_the_setting(llava4):
    with pytest.raises(ValueError, match="method must be one of"):
        vtexit.config_from_dict({"method": "nope"})
    with pytest.raises(ValueError, match="unknown settings"):
        vtexit.config_from_dict({"method": "vtw", "layer": 2, "keep": 0.5})
    with pytest.raises(ValueError, match="layer"):
        vtexit.config_from_dict({"method": "vtw", "layer": "two"})
    with pytest.raises(ValueError, match="config must be"):
        vtexit.apply(llava4.model, ["vtw", 2])
    with pytest.raises(ValueError, match="method must be one of"):  # a dict is read as config_from_dict reads it
        vtexit.apply(llava4.model, {"method": "nope"})
    assert getattr(llava4.model, "_vtexit_engine", None) is None  # refused before anything was attached


# ------------------------------------------------------------------------------------------- cost records
@torch.no_grad()
def test_cost_records_count_what_each_layer_ran(llava4):
    inputs = llava4.inputs([1, 0, 2], text_len=[5, 9, 3])
    media = llava4.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    visual, text = (media & real).sum(1), (~media & real).sum(1)
    with vtexit.withdraw(llava4.model, layer=2) as handle:
        llava4.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        cost = handle.last_cost
    prefill = cost.prefill.layers
    for i, layer in enumerate(prefill):
        expected_visual = visual if i < 2 else torch.zeros_like(visual)
        assert torch.equal(layer.visual_queries, expected_visual) and torch.equal(layer.text_queries, text), i
        assert torch.equal(layer.keys, expected_visual + text)
    assert len(cost.decode) == 2  # 3 new tokens: the prefill and two decode steps
    for step, call in enumerate(cost.decode):
        for i, layer in enumerate(call.layers):
            assert layer.queries.tolist() == [1, 1, 1]
            kept = (visual if i < 2 else 0) + text
            assert layer.keys.tolist() == (kept + step + 1).tolist(), (step, i)  # prompt + fed tokens
    with vtexit.baseline(llava4.model) as handle:
        out = llava4.model(**inputs).logits
        assert handle.last_cost.tokens_per_layer().tolist() == [(visual + text).tolist()] * 4
    assert torch.equal(out, llava4.model(**inputs).logits)


# ------------------------------------------------------------------------------------------- modules
class _GatedExit(vtexit.Policy):
    """A gate (a method-owned module) scores the last token; rows whose score is positive exit at layer 2."""

    def __init__(self, hidden: int):
        self.gate = nn.Linear(hidden, 1)
        self.seen_dtype = None

    def modules(self):
        return {"gate": self.gate}

    def keep(self, view):
        if view.layer_idx != 2:
            return None
        self.seen_dtype = self.gate.weight.dtype
        score = self.gate(view.hidden_states[:, -1]).squeeze(-1)
        view.state["exits"] = score > 0
        return view.layout.valid & ~(view.media & (score > 0).unsqueeze(1))


@torch.no_grad()
def test_method_modules_follow_the_model_dtype():
    case = build_tiny("llava", num_layers=4)
    model = case.model.to(torch.float64)
    policy = _GatedExit(model.config.text_config.hidden_size)
    with vtexit.apply_policy(model, policy) as handle:
        model(**case.inputs([1], text_len=[4]))
        exits = handle.last_policy_state["exits"]
        model(**case.inputs([0], text_len=[4]))  # a text-only call: no prefill of the policy, state unchanged
        assert handle.last_policy_state["exits"] is exits
    assert policy.seen_dtype == torch.float64 and policy.gate.weight.dtype == torch.float64


# ------------------------------------------------------------------------------------------- renumbering
class _RenumberedWithdrawal(vtexit.Policy):
    renumber_positions = True

    def __init__(self, layer: int):
        self.layer = layer

    def keep(self, view):
        return view.text if view.layer_idx == self.layer else None


@torch.no_grad()
def test_renumbered_positions_match_layers_run_by_hand_and_decode(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    media = llava4.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    seen = record_layer_inputs(llava4.model, inputs)
    with vtexit.apply_policy(llava4.model, _RenumberedWithdrawal(2)) as handle:
        logits = llava4.model(**inputs).logits
        layout = handle.last_layout
        generated = llava4.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):
            step = llava4.model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)
    for b in range(2):
        text = (real[b] & ~media[b]).nonzero().squeeze(1)
        expected = scheduled_logits(llava4.model, seen, b, [(2, text)], renumber=True)
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)
    with vtexit.withdraw(llava4.model, layer=2):
        assert not torch.allclose(llava4.model(**inputs).logits[:, -1], logits[:, -1])  # renumbering mattered


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_renumbering_is_refused_where_positions_are_not_1d(family):
    case = build_tiny(family)
    with pytest.raises(ValueError, match="renumber_positions"):
        vtexit.apply_policy(case.model, _RenumberedWithdrawal(3))
    assert not hasattr(case.model, "_vtexit_engine")


# ------------------------------------------------------------------------------------------- replacement forwards
class _SplitMLPWithdrawal(vtexit.Policy):
    """Withdraws at layer 2 and replaces every MLP with one that computes visual rows and text rows apart."""

    def __init__(self):
        self.calls = 0

    def keep(self, view):
        return view.text if view.layer_idx == 2 else None

    def replacements(self, engine):
        policy = self

        def split_forward(mlp, hidden):
            policy.calls += 1
            media = engine.current_media()
            original = type(mlp).forward
            if media is None or media.shape != hidden.shape[:2]:
                return original(mlp, hidden)
            out = torch.empty_like(hidden)
            for rows in (media, ~media):
                out[rows] = original(mlp, hidden[rows])
            return out

        return {layer.mlp: split_forward for layer in engine.parts.layers}


@torch.no_grad()
def test_replacement_forwards_combine_with_a_schedule_and_remove_restores(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    base = llava4.model(**inputs).logits
    with vtexit.withdraw(llava4.model, layer=2):
        withdrawn = llava4.model(**inputs).logits
        withdrawn_gen = llava4.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    policy = _SplitMLPWithdrawal()
    mlps = [layer.mlp for layer in llava4.model.model.language_model.layers]
    with vtexit.apply_policy(llava4.model, policy):
        assert all("forward" in mlp.__dict__ for mlp in mlps)
        torch.testing.assert_close(llava4.model(**inputs).logits, withdrawn, atol=1e-6, rtol=1e-5)
        assert torch.equal(llava4.model.generate(**inputs, max_new_tokens=3, do_sample=False), withdrawn_gen)
    assert policy.calls > 0
    assert all("forward" not in mlp.__dict__ for mlp in mlps)
    assert torch.equal(llava4.model(**inputs).logits, base)


def test_flops_of_in_layer_fractions_by_hand(llava4):
    from vtexit.core.flops import DecoderShape

    shape = DecoderShape.from_model(llava4.model)
    d, h, kv, dh, m = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    visual, text, keys = 10, 6, 16
    by_hand = (
        (text + visual / 2) * d * 2 * h * dh  # q and o projections: visual rows use half of the heads
        + (visual + text) * d * 2 * kv * dh  # k and v projections for every row
        + 2 * (text + visual / 2) * keys * h * dh  # scores and weighted values of the heads that ran
        + 3 * (text + visual / 4) * d * m  # gated MLP: visual rows use a quarter of the neurons
    )
    assert shape.split_layer(visual, text, keys, head_fraction=0.5, ffn_fraction=0.25) == pytest.approx(by_hand)
    assert shape.split_layer(visual, text, keys) == shape.layer(visual + text, keys)
