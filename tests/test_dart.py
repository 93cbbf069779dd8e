"""DART against its rule worked out by hand (keys of layer K-1 recomputed from the unpatched model's recorded layer
inputs, pivots and turns with plain Python sets) and decoder layers run by hand on the kept positions; cached
generate against a no-cache recomputation; no attention map needed (SDPA stays on)."""

from __future__ import annotations

import sys

import pytest
import torch
from reduced_prompt import greedy_case, keep_count
from reference import greedy_no_cache, record_layer_inputs, scheduled_logits

import vtexit
from vtexit.testing.tiny_models import build_tiny

LAYER, KEEP, PIVOTS_VISUAL, PIVOTS_TEXT = 2, 0.75, 2, 1


def _kept_by_hand(model, seen, inputs: dict, media: torch.Tensor, b: int) -> list[int]:
    core = model.model
    lm = core.text_model if hasattr(core, "text_model") else core.language_model
    previous = lm.layers[LAYER - 1]
    attention = previous.self_attn
    hidden, kwargs = seen[LAYER - 1]
    x = previous.input_layernorm(hidden[b : b + 1])
    keys = attention.k_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
    if getattr(attention, "k_norm", None) is not None:
        keys = attention.k_norm(keys.transpose(1, 2)).transpose(1, 2)
    cos, sin = (t[b : b + 1] if t.shape[0] > 1 else t for t in kwargs["position_embeddings"])
    keys, _ = sys.modules[type(attention).__module__].apply_rotary_pos_emb(keys, keys, cos, sin)
    strength = keys[0].abs().sum(dim=(0, 2))  # L1 over heads and dims, per position
    normed = lm.norm(seen[LAYER][0][b])
    real = inputs["attention_mask"][b].bool()
    visual = [i for i in range(media.shape[1]) if media[b, i] and real[i]]
    text = [i for i in range(media.shape[1]) if real[i] and not media[b, i]]
    after = [i for i in text if i > max(visual)] if visual else []
    pivots_visual = sorted(visual, key=lambda i: (-float(strength[i]), i))[:PIVOTS_VISUAL]
    pivots_text = sorted(after, key=lambda i: (-float(strength[i]), i))[:PIVOTS_TEXT]
    per_pivot = keep_count(len(visual), KEEP) // (PIVOTS_VISUAL + PIVOTS_TEXT)
    pool = set(visual) - set(pivots_visual)
    for pivot in sorted(pivots_visual + pivots_text):
        similarity = {i: float(torch.cosine_similarity(normed[pivot], normed[i], dim=0)) for i in pool}
        pool -= set(sorted(pool, key=lambda i: (similarity[i], i))[:per_pivot])
    return sorted(set(text) | (set(visual) - pool))


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "internvl"])
def case(request):
    return greedy_case(request.param)


@torch.no_grad()
def test_dart_keeps_what_its_rule_keeps_and_equals_layers_run_by_hand(case):
    model = case.model
    inputs = case.inputs([2, 1], text_len=[5, 4])
    media = case.media_mask(inputs)
    seen = record_layer_inputs(model, inputs)
    config = vtexit.DARTConfig(layer=LAYER, keep=KEEP, pivots_visual=PIVOTS_VISUAL, pivots_text=PIVOTS_TEXT)
    with vtexit.apply(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        kept_mask = handle.last_policy_state["kept"][LAYER]
    assert (media & inputs["attention_mask"].bool() & ~kept_mask).any()  # the budget really dropped something
    for b in range(media.shape[0]):
        kept = _kept_by_hand(model, seen, inputs, media, b)
        assert kept_mask[b].nonzero().flatten().tolist() == kept
        expected = scheduled_logits(model, seen, b, [(LAYER, torch.tensor(kept))])
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_dart_generate_equals_no_cache_recomputation(case):
    model = case.model
    inputs = case.inputs([2, 1], text_len=[5, 4])
    suppress = sorted(vtexit.core.families.family_for(model).media_token_ids(model.config))
    with vtexit.dart(model, layer=LAYER, keep=KEEP):
        cached = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=suppress)
        recomputed = greedy_no_cache(model, inputs, 3, suppress=suppress)
    assert cached.tolist() == recomputed.tolist()


def test_dart_settings_are_checked():
    with pytest.raises(ValueError, match="pivots_text"):
        vtexit.DARTConfig(pivots_text=-1)
    with pytest.raises(ValueError, match="at least 1"):
        vtexit.DARTConfig(pivots_visual=0, pivots_text=0)
    model = build_tiny("llava", num_layers=4).model
    with pytest.raises(ValueError, match="layer must be in"):
        vtexit.dart(model, layer=0)
    assert vtexit.config_from_dict({"method": "dart", "keep": "0.5"}) == vtexit.DARTConfig(keep=0.5)
