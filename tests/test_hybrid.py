"""A hybrid (DivPrune before the language model, then an in-LLM method) against layers run by hand: the unpatched
model's layer inputs on the reduced prompt built by hand, then the in-LLM schedule on that prompt's positions; cached
generate against a no-cache recomputation; one ``remove()`` restores the model."""

from __future__ import annotations

import pytest
import torch
from reduced_prompt import greedy_case, reduced_prompt
from reference import greedy_no_cache, record_layer_inputs, scheduled_logits

import vtexit

PRE = {"method": "divprune", "keep": 0.3}


@pytest.fixture(scope="module")
def llava():
    return greedy_case("llava")


@torch.no_grad()
@pytest.mark.parametrize("images_per_row, text_len", [([1], [6]), ([1, 2], [5, 3])])
def test_divprune_then_vtw_equals_layers_run_by_hand(llava, images_per_row, text_len):
    model, layer = llava.model, 2
    inputs = llava.inputs(images_per_row, text_len=text_len)
    embeds, mask = reduced_prompt(llava, inputs, PRE["keep"])
    media = llava.media_mask(inputs)
    seen = record_layer_inputs(model, {"inputs_embeds": embeds, "attention_mask": mask})
    config = vtexit.HybridConfig(pre=PRE, then={"method": "vtw", "layer": layer})
    with vtexit.apply(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        tokens = handle.last_cost.tokens_per_layer()
    for b in range(embeds.shape[0]):
        text = int((~media[b] & inputs["attention_mask"][b].bool()).sum())
        pad = int((mask[b] == 0).sum())
        # The reduced row's text slots, after its left padding: its kept tokens in order, the text ones.
        kept = [flag for flag in _kept_flags(llava, inputs, b) if flag is not None]
        slots = torch.tensor([pad + j for j, is_media in enumerate(kept) if not is_media])
        assert len(slots) == text
        expected = scheduled_logits(model, seen, b, [(layer, slots)])
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)
        assert tokens[layer:, b].tolist() == [text] * (len(tokens) - layer)
        assert tokens[:layer, b].tolist() == [int(mask[b].sum())] * layer


def _kept_flags(case, inputs: dict, b: int) -> list[bool | None]:
    """For row b's real prompt tokens in order: media flag if the hand-built reduction keeps it, else None."""
    from reduced_prompt import greedy_by_hand, keep_count, layer0_inputs

    embeds = layer0_inputs(case.model, inputs)
    media = case.media_mask(inputs)[b]
    real = inputs["attention_mask"][b].bool()
    visual = [i for i in range(media.shape[0]) if media[i] and real[i]]
    chosen = greedy_by_hand(embeds[b].double().numpy(), visual, keep_count(len(visual), PRE["keep"]))
    return [bool(media[i]) if (not media[i] or i in chosen) else None for i in range(media.shape[0]) if real[i]]


@torch.no_grad()
def test_hybrid_generate_equals_no_cache_recomputation_and_remove_restores(llava):
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    before = model(**inputs).logits
    config = vtexit.HybridConfig(pre=PRE, then={"method": "vtw", "layer": 2})
    image = model.config.image_token_id
    with vtexit.apply(model, config):
        cached = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, suppress_tokens=[image])
        recomputed = greedy_no_cache(model, inputs, 4, suppress=[image])
    assert cached.tolist() == recomputed.tolist()
    assert torch.equal(model(**inputs).logits, before)
    assert vtexit.patch_of(model) is None


def test_hybrid_settings_are_checked_before_the_model_is_touched(llava):
    model = llava.model
    with pytest.raises(ValueError, match="pre must be one of"):
        vtexit.HybridConfig(pre={"method": "vtw", "layer": 2}, then={"method": "vtw", "layer": 2})
    with pytest.raises(ValueError, match="then must be an in-LLM"):
        vtexit.HybridConfig(pre=PRE, then={"method": "divprune", "keep": 0.5})
    with pytest.raises(ValueError, match="layer must be"):
        vtexit.apply(model, vtexit.HybridConfig(pre=PRE, then={"method": "vtw", "layer": 9}))
    assert vtexit.patch_of(model) is None
    config = vtexit.HybridConfig(pre=PRE, then={"method": "fastv", "layer": 2, "keep": 0.5})
    assert vtexit.config_from_dict(config.to_dict()) == config


def test_hybrid_from_flat_dotted_settings_as_model_args_give_them():
    flat = {"method": "hybrid", "pre.method": "divprune", "pre.keep": "0.3", "then.method": "vtw", "then.layer": "2"}
    assert vtexit.config_from_dict(flat) == vtexit.HybridConfig(pre=PRE, then={"method": "vtw", "layer": 2})
    with pytest.raises(ValueError, match="given both as a value and as pre"):
        vtexit.config_from_dict({**flat, "pre": "divprune"})
    with pytest.raises(ValueError, match="a name on each side of the dot"):
        vtexit.config_from_dict({**flat, "then.": "2"})
