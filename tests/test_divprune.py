"""DivPrune before the language model: its selection rule against a brute-force greedy, and the patched model against
the unpatched model run on the reduced prompt built by hand (the kept tokens' first-layer inputs, fed as
``inputs_embeds``), forward and cached generate, on three families with 1D rotary positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtexit
from vtexit.methods.divprune import max_min_diverse
from vtexit.methods.fastv.ranking import keep_counts
from vtexit.testing.tiny_models import build_tiny

FAMILIES = ("llava", "llava_next", "internvl")


def _greedy_by_hand(features: np.ndarray, candidates: list[int], count: int) -> set[int]:
    """Max-min diversity, greedy, in float64 with plain loops: the most isolated candidate first, then the one
    farthest from everything chosen; ties to the lower position."""
    unit = {i: features[i] / np.linalg.norm(features[i]) for i in candidates}

    def distance(i: int, j: int) -> float:
        return 1.0 - float(unit[i] @ unit[j])

    def isolation(i: int) -> float:
        others = [distance(i, j) for j in candidates if j != i]
        return min(others) if others else float("inf")

    chosen: list[int] = []
    for _ in range(count):
        rest = [i for i in candidates if i not in chosen]
        scores = [isolation(i) if not chosen else min(distance(i, j) for j in chosen) for i in rest]
        chosen.append(rest[int(np.argmax(scores))])  # argmax returns the first of equal maxima
    return set(chosen)


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
        expected = _greedy_by_hand(features[b].double().numpy(), rows, int(count[b]))
        assert set(chosen[b].nonzero().flatten().tolist()) == expected
    assert not (chosen & ~candidates).any()


def _layer0_inputs(model, inputs: dict) -> torch.Tensor:
    """The first decoder layer's input of the unpatched model: the prompt's embeddings with the projected visual
    features in place."""
    seen = {}
    first = model.model.language_model.layers[0]
    hook = first.register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return seen["h"]


def _reduced_prompt(case, inputs: dict, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept first-layer inputs (text, and the visual tokens the brute-force greedy chooses), left-padded
    with zero vectors, and their attention mask."""
    embeds = _layer0_inputs(case.model, inputs)
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    counts = keep_counts(media.sum(1), keep)
    rows = []
    for b in range(embeds.shape[0]):
        visual = media[b].nonzero().flatten().tolist()
        chosen = _greedy_by_hand(embeds[b].double().numpy(), visual, int(counts[b])) if visual else set()
        real = inputs["attention_mask"][b].bool()
        kept = [i for i in range(embeds.shape[1]) if real[i] and (not media[b, i] or i in chosen)]
        rows.append(embeds[b, kept])
    longest = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), longest, embeds.shape[-1], dtype=embeds.dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    return padded, mask


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    case = build_tiny(request.param, num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


@torch.no_grad()
@pytest.mark.parametrize("images_per_row, text_len", [([1], [6]), ([1, 2, 0], [5, 3, 7])])
def test_divprune_equals_the_unpatched_model_on_the_reduced_prompt(case, images_per_row, text_len):
    model = case.model
    inputs = case.inputs(images_per_row, text_len=text_len)
    keep = 0.3
    embeds, mask = _reduced_prompt(case, inputs, keep)
    reference = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True)
    generate.update(return_dict_in_generate=True)
    reference_steps = model.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
    with vtexit.apply(model, vtexit.DivPruneConfig(keep=keep)) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        tokens_per_layer = handle.last_cost.tokens_per_layer()
        steps = model.generate(**inputs, **generate)
    # The kept slots of each row, in order, against the reference's real slots (positions differ by a constant per
    # padded row, which rotary attention does not see).
    assert layout.valid.sum(1).tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(logits[layout.valid], reference[mask.bool()], atol=2e-5, rtol=1e-4)
    assert tokens_per_layer.tolist() == [mask.sum(1).tolist()] * len(tokens_per_layer)  # every layer, layer 0 too
    new = steps.sequences[:, inputs["input_ids"].shape[1] :]
    assert new.tolist() == reference_steps.sequences.tolist()
    for step, expected in zip(steps.logits, reference_steps.logits, strict=True):
        torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_divprune_shortens_the_kv_cache_of_every_layer():
    case = build_tiny("llava", num_layers=4)
    inputs = case.inputs([1], text_len=6)
    text = int((~case.media_mask(inputs)).sum())
    visual = inputs["input_ids"].shape[1] - text
    with vtexit.divprune(case.model, keep=0.25):
        cache = case.model(**inputs, use_cache=True).past_key_values
    kept = text + int(keep_counts(torch.tensor([visual]), 0.25))
    assert [layer.keys.shape[2] for layer in cache.layers] == [kept] * 4


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_divprune_refuses_families_without_1d_positions(family):
    model = build_tiny(family, num_layers=4).model
    with pytest.raises(ValueError, match="not supported for|must keep the full sequence|to keep the full sequence"):
        vtexit.divprune(model, keep=0.5)
    assert vtexit.patch_of(model) is None


@torch.no_grad()
def test_divprune_refuses_static_caches_and_bad_settings():
    case = build_tiny("llava", num_layers=4)
    inputs = case.inputs([1], text_len=6)
    with pytest.raises(ValueError, match="keep must be in"):
        vtexit.divprune(case.model, keep=1.5)
    with vtexit.divprune(case.model, keep=0.5):
        with pytest.raises(ValueError, match="static caches"):
            case.model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    assert vtexit.config_from_dict({"method": "divprune", "keep": "0.25"}) == vtexit.DivPruneConfig(keep=0.25)
