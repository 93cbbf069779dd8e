"""DivPrune before the language model: its selection rule against a brute-force greedy, and the patched model against
the unpatched model run on the reduced prompt built by hand (the kept tokens' first-layer inputs, fed as
``inputs_embeds``), forward and cached generate, on three families with 1D rotary positions."""

from __future__ import annotations

import pytest
import torch
from reduced_prompt import (
    check_against_reduced_prompt,
    decode_by_hand,
    greedy_by_hand,
    greedy_case,
    keep_count,
    reduced_prompt,
)
from transformers import DynamicCache, StaticCache

import vtexit
from vtexit.core.transformers_compat import cache_kwargs, output_cache
from vtexit.methods.divprune import max_min_diverse
from vtexit.testing.tiny_models import build_tiny

FAMILIES = ("llava", "llava_next", "internvl")


def test_selection_matches_a_brute_force_greedy():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 40, 16, generator=generator)
    candidates = torch.rand(3, 40, generator=generator) < 0.7
    candidates[2] = False
    candidates[2, 5] = True  # a row with one candidate
    count = torch.tensor([1, 9, 1])
    chosen = max_min_diverse(features, candidates, count)
    for b in range(3):
        rows = [i for i in range(40) if candidates[b, i]]
        expected = greedy_by_hand(features[b].double().numpy(), rows, int(count[b]))
        assert set(chosen[b].nonzero().flatten().tolist()) == expected
    assert not (chosen & ~candidates).any()


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return greedy_case(request.param)


@torch.no_grad()
@pytest.mark.parametrize("images_per_row, text_len", [([1], [6]), ([1, 2, 0], [5, 3, 7])])
def test_divprune_equals_the_unpatched_model_on_the_reduced_prompt(case, images_per_row, text_len):
    inputs = case.inputs(images_per_row, text_len=text_len)
    embeds, mask = reduced_prompt(case, inputs, 0.3)
    check_against_reduced_prompt(case.model, inputs, embeds, mask, lambda m: vtexit.divprune(m, keep=0.3), steps=4)


@torch.no_grad()
def test_divprune_on_a_static_cache_equals_the_unpatched_model_on_the_reduced_prompt(case):
    """Every layer's static buffers hold the reduced prompt (layer 0 too, so generate's own decode mask no longer
    fits them): the decode steps still give the reduced prompt's tokens and logits."""
    inputs = case.inputs([1, 2, 0], text_len=[5, 3, 7])
    embeds, mask = reduced_prompt(case, inputs, 0.3)
    patch = lambda m: vtexit.divprune(m, keep=0.3)  # noqa: E731
    check_against_reduced_prompt(case.model, inputs, embeds, mask, patch, steps=4, cache_implementation="static")


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_decode_steps_called_by_hand_number_new_tokens_as_on_the_reduced_prompt(static):
    """A loop of forward calls without ``position_ids``: transformers numbers new tokens from layer 0's cache, which
    holds the reduced prompt; the unpatched model on the reduced prompt, run by the same loop, is the reference."""
    case = greedy_case("llava")
    model, steps = case.model, 3
    inputs = case.inputs([1, 2, 0], text_len=[5, 3, 7])
    embeds, mask = reduced_prompt(case, inputs, 0.3)
    prefill = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    expected = decode_by_hand(model, prefill, output_cache(prefill), mask, steps)
    with vtexit.divprune(model, keep=0.3):
        length = inputs["input_ids"].shape[1] + steps + 1
        cache = StaticCache(config=model.config, max_cache_len=length) if static else DynamicCache(config=model.config)
        prefill = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
        logits = decode_by_hand(model, prefill, cache, inputs["attention_mask"], steps)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_divprune_shortens_the_kv_cache_of_every_layer():
    case = build_tiny("llava", num_layers=4)
    inputs = case.inputs([1], text_len=6)
    text = int((~case.media_mask(inputs)).sum())
    visual = inputs["input_ids"].shape[1] - text
    with vtexit.divprune(case.model, keep=0.25):
        cache = case.model(**inputs, use_cache=True).past_key_values
    kept = text + keep_count(visual, 0.25)
    assert [layer.keys.shape[2] for layer in cache.layers] == [kept] * 4


@torch.no_grad()
def test_divprune_refuses_bad_settings():
    case = build_tiny("llava", num_layers=4)
    with pytest.raises(ValueError, match="keep must be in"):
        vtexit.divprune(case.model, keep=1.5)
    assert vtexit.config_from_dict({"method": "divprune", "keep": "0.25"}) == vtexit.DivPruneConfig(keep=0.25)
