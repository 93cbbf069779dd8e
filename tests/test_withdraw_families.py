"""The shared checks of VTW, run over every supported family and both attention implementations.

Like transformers' tester mixins: one set of properties, many tiny random models built from the real classes.
Every expected value comes from the unpatched model or from layers run by hand (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch
from reference import record_layer_inputs, withdrawn_logits

import vtexit
from vtexit.testing.tiny_models import FAMILIES, build_tiny

ATTN = ("sdpa", "eager")
BATCH = dict(images_per_row=[1, 0, 2], text_len=[5, 9, 3])
NEW_TOKENS = 5
TOKEN_TYPE_KEYS = {"token_type_ids", "mm_token_type_ids"}


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    torch.manual_seed(0)
    family, attn = request.param
    case = build_tiny(family, attn_implementation=attn)
    case.model.generation_config.eos_token_id = None  # fixed-length greedy runs, comparable step by step
    case.model.generation_config.pad_token_id = 0
    return case


def _inputs(case, **overrides):
    kwargs = dict(BATCH)
    if case.name == "llava_onevision":
        kwargs["videos_per_row"] = [0, 1, 0]
    kwargs.update(overrides)
    return case.inputs(**kwargs)


def _layers(case) -> tuple[int, int]:
    return vtexit.valid_layer_range(case.model)


def _hooks(model) -> dict:
    """Every forward (pre-)hook on the model; transformers itself installs some on first use."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


@torch.no_grad()
def test_layer_n_is_identity(case):
    inputs = _inputs(case)
    base = case.model(**inputs).logits
    _, n = _layers(case)
    with vtexit.withdraw(case.model, layer=n):
        patched = case.model(**inputs).logits
    assert torch.equal(base, patched)


@torch.no_grad()
def test_matches_layers_run_by_hand(case):
    inputs = _inputs(case)
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
    inputs = _inputs(case)
    low, n = _layers(case)
    k = (low + n) // 2
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    with vtexit.withdraw(case.model, layer=k):
        generated = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(NEW_TOKENS):
            step = dict(inputs, input_ids=ids, attention_mask=mask)
            for key in TOKEN_TYPE_KEYS & step.keys():  # per-token inputs grow with the sequence (text = 0)
                grown = torch.zeros_like(ids)
                grown[:, : step[key].shape[1]] = step[key]
                step[key] = grown
            logits = case.model(**step, use_cache=False).logits[:, -1]
            logits[:, media_ids] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


@torch.no_grad()
def test_withdrawn_layers_cache_fewer_positions(case):
    inputs = _inputs(case)
    media = case.media_mask(inputs)
    low, n = _layers(case)
    k = (low + n) // 2
    with vtexit.withdraw(case.model, layer=k):
        cache = case.model(**inputs, use_cache=True).past_key_values
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
    inputs = _inputs(case)
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
    inputs = _inputs(case)
    base = case.model(**inputs).logits
    hooks_before = _hooks(case.model)
    low, _ = _layers(case)
    handle = vtexit.withdraw(case.model, layer=low)
    assert case.model(**inputs).logits.shape[1] < base.shape[1]  # the patch was active
    handle.remove()
    assert _hooks(case.model) == hooks_before and not hasattr(case.model, "_vtexit_engine")
    assert torch.equal(case.model(**inputs).logits, base)
