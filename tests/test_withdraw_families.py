"""The shared checks of VTW, run over every supported family and both attention implementations.

Like transformers' tester mixins: one set of properties, many tiny random models built from the real classes.
Every expected value comes from the unpatched model or from layers run by hand (tests/reference.py).
"""

from __future__ import annotations

import torch
from conftest import family_batch
from reference import greedy_no_cache, record_layer_inputs, withdrawn_logits

import vtexit
from vtexit.core.transformers_compat import output_cache

NEW_TOKENS = 5


def _layers(case) -> tuple[int, int]:
    return vtexit.valid_layer_range(case.model)


def _hooks(model) -> dict:
    """Every forward (pre-)hook on the model; transformers itself installs some on first use."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


@torch.no_grad()
def test_layer_n_is_identity(case):
    inputs = family_batch(case)
    base = case.model(**inputs).logits
    _, n = _layers(case)
    with vtexit.withdraw(case.model, layer=n):
        patched = case.model(**inputs).logits
    assert torch.equal(base, patched)


@torch.no_grad()
def test_matches_layers_run_by_hand(case):
    inputs = family_batch(case)
    media = case.media_mask(inputs)
    padding = inputs["attention_mask"].bool()
    seen = record_layer_inputs(case.model, inputs)
    low, n = _layers(case)
    for k in sorted({low, (low + n) // 2, n - 1}):
        with vtexit.withdraw(case.model, layer=k) as handle:
            logits = case.model(**inputs).logits
            layout = handle.last_layout
        for b in range(logits.shape[0]):
            text = (padding[b] & ~media[b]).nonzero().squeeze(1)
            expected = withdrawn_logits(case.model, seen, b, text, k)
            got = logits[b][layout.valid[b]]
            assert got.shape == expected.shape, f"K={k} row {b}"
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"K={k} row {b}")
            assert torch.equal(layout.index[b][layout.valid[b]], text)


@torch.no_grad()
def test_generate_with_cache_equals_no_cache_recomputation(case):
    inputs = family_batch(case)
    low, n = _layers(case)
    k = (low + n) // 2
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    with vtexit.withdraw(case.model, layer=k):
        generated = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids)
        expected = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
    assert torch.equal(generated, expected)


@torch.no_grad()
def test_withdrawn_layers_cache_fewer_positions(case):
    inputs = family_batch(case)
    media = case.media_mask(inputs)
    low, n = _layers(case)
    k = (low + n) // 2
    with vtexit.withdraw(case.model, layer=k):
        cache = output_cache(case.model(**inputs, use_cache=True))
    length = inputs["input_ids"].shape[1]
    kept = int((inputs["attention_mask"].bool() & ~media).sum(1).max())
    for i in range(n):
        expected = length if i < k else kept
        keys = cache.layers[i].keys
        window = getattr(cache.layers[i], "sliding_window", None)
        if window:
            expected = min(expected, keys.shape[-2])  # sliding layers keep only their window
        assert keys.shape[-2] == expected, f"layer {i}"
    assert kept < length


@torch.no_grad()
def test_rows_without_images_are_untouched(case):
    inputs = family_batch(case)
    media = case.media_mask(inputs)
    base = case.model(**inputs).logits
    low, _ = _layers(case)
    with vtexit.withdraw(case.model, layer=low) as handle:
        logits = case.model(**inputs).logits
        layout = handle.last_layout
    for b in range(base.shape[0]):
        if media[b].any():
            continue
        real = inputs["attention_mask"][b].bool()
        torch.testing.assert_close(logits[b][layout.valid[b]], base[b][real], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_remove_restores_the_model_bit_for_bit(case):
    inputs = family_batch(case)
    base = case.model(**inputs).logits
    hooks_before = _hooks(case.model)
    low, _ = _layers(case)
    handle = vtexit.withdraw(case.model, layer=low)
    assert case.model(**inputs).logits.shape[1] < base.shape[1]  # the patch was active
    handle.remove()
    assert _hooks(case.model) == hooks_before and not hasattr(case.model, "_vtexit_engine")
    assert torch.equal(case.model(**inputs).logits, base)
