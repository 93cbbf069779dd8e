"""Withdrawal on transformers' StaticCache, eager and under generate's own compiled decode.

References: greedy decoding recomputed without a cache (every family), the dynamic-cache result of the same patch
(every method), and the unpatched model. Compiled decode runs with the ``eager`` Dynamo backend and
``fullgraph=True`` (any graph break fails), forced on CPU with ``_compile_all_devices``; a second generate must not
recompile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import family_batch
from reduced_prompt import keep_count
from reference import greedy_no_cache
from transformers import CompileConfig, StaticCache

import vtexit
from vtexit.core.transformers_compat import cache_kwargs, compiled_decode_config
from vtexit.testing.tiny_models import build_tiny

NEW_TOKENS = 4


def _compiled_decode(fullgraph: bool = True) -> CompileConfig:
    return compiled_decode_config(backend="eager", mode=None, fullgraph=fullgraph)


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def _generate_compiled_without_recompiling(model, inputs, **kwargs):
    """Two compiled static generates: the second may reuse the graphs only (a recompile raises)."""
    torch._dynamo.reset()
    first = _generate(model, inputs, cache_implementation="static", compile_config=_compiled_decode(), **kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _generate(model, inputs, cache_implementation="static", compile_config=_compiled_decode(), **kwargs)
    assert hasattr(model, "_compiled_call")  # generate did use its compiled forward
    assert torch.equal(first, second)
    return first


@torch.no_grad()
def test_static_and_compiled_decode_equal_no_cache_recomputation(case):
    inputs = family_batch(case)
    n = case.model.config.get_text_config().num_hidden_layers
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    with vtexit.withdraw(case.model, layer=max(2, n // 2)):
        if case.name == "gemma3":  # sliding-window layers: their static buffers are ring buffers
            with pytest.raises(ValueError, match="StaticLayer"):
                _generate(case.model, inputs, cache_implementation="static")
            return
        expected = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
        static = _generate(case.model, inputs, cache_implementation="static", suppress_tokens=media_ids)
        compiled = _generate_compiled_without_recompiling(case.model, inputs, suppress_tokens=media_ids)
    assert torch.equal(static, expected)
    assert torch.equal(compiled, expected)


METHODS = [
    vtexit.VTWConfig(layer=2),
    vtexit.FastVConfig(layer=2, keep=0.5),
    vtexit.PDropConfig(layers=(1, 3), keep=0.25, renumber=True),
    vtexit.RandomDropConfig(layer=2, keep=0.5, seed=3),
    vtexit.YOPOConfig(layer_drop=2),
    # Before the language model (layer 0 holds fewer slots than the prompt), alone and then withdrawn.
    vtexit.DivPruneConfig(keep=0.3),
    vtexit.PoolConfig(),
    vtexit.VisionZipConfig(keep=0.5),
    vtexit.HybridConfig(pre={"method": "divprune", "keep": 0.5}, then={"method": "vtw", "layer": 2}),
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request):
    case = build_tiny("llava", num_layers=4, attn_implementation=request.param)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


@torch.no_grad()
@pytest.mark.parametrize("config", METHODS, ids=lambda c: c.method)
def test_every_fixed_schedule_method_decodes_on_a_static_cache(llava, config):
    inputs = llava.inputs([1, 0, 2], text_len=[5, 9, 3])
    unpatched = llava.model(**inputs).logits[:, -1]
    with vtexit.apply(llava.model, config):
        patched = llava.model(**inputs).logits[:, -1]
        dynamic = _generate(llava.model, inputs)
        static = _generate(llava.model, inputs, cache_implementation="static")
        compiled = _generate_compiled_without_recompiling(llava.model, inputs)
    assert not torch.allclose(patched, unpatched)  # the method changed the model, so equality below means something
    assert torch.equal(static, dynamic)
    assert torch.equal(compiled, dynamic)


@torch.no_grad()
def test_dyvte_per_row_exits_decode_on_a_static_cache(llava):
    inputs = llava.inputs([1, 0, 2], text_len=[5, 9, 3])
    gates = vtexit.DyVTEGates.for_model(llava.model)
    with torch.no_grad():
        gates.gates["2"].fc2.bias[1] = 5.0  # rows exit at layer 2 or later, as their features say
    with vtexit.dyvte(llava.model, gates, threshold=0.5):
        dynamic = _generate(llava.model, inputs)
        static = _generate(llava.model, inputs, cache_implementation="static")
        compiled = _generate_compiled_without_recompiling(llava.model, inputs)
    assert torch.equal(static, dynamic)
    assert torch.equal(compiled, dynamic)


@torch.no_grad()
def test_yopo_in_layer_strategies_on_a_static_cache(llava):
    """Window, heads and sparse FFN replace layer forwards that read per-call state in decode: exact on a static
    cache, eagerly and under transformers' compiled decode (which then breaks its graph around them)."""
    inputs = llava.inputs([1, 0, 2], text_len=[5, 9, 3])
    heads = torch.ones(4, llava.model.config.get_text_config().num_attention_heads, dtype=torch.bool)
    heads[1:, ::2] = False
    config = vtexit.YOPOConfig(window=3, heads=vtexit.HeadMask(heads), ffn_ratio=2)
    with vtexit.apply(llava.model, config):
        dynamic = _generate(llava.model, inputs)
        static = _generate(llava.model, inputs, cache_implementation="static")
        torch._dynamo.reset()
        compiled = _compiled_decode(fullgraph=False)  # transformers' default
        compiled = _generate(llava.model, inputs, cache_implementation="static", compile_config=compiled)
    assert torch.equal(static, dynamic)
    assert torch.equal(compiled, dynamic)


@torch.no_grad()
def test_a_compacted_static_cache_outlives_its_patch_only_after_reset(llava):
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    expected = _generate(model, inputs, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS)
    with vtexit.withdraw(model, layer=2):
        _generate(model, inputs, **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match="non-empty static cache"):
            _generate(model, inputs, **cache_kwargs(model, cache))  # a new prompt on a filled cache
    with pytest.raises(ValueError, match="patch has been removed"):
        model(**inputs, **cache_kwargs(model, cache))
    other = copy.deepcopy(model)
    cache.reset()
    with vtexit.withdraw(model, layer=2), vtexit.withdraw(other, layer=3):
        model(**inputs, **cache_kwargs(model, cache))
        step = dict(input_ids=inputs["input_ids"][:, -1:], **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match="another vtexit patch"):
            other(**step)
    cache.reset()  # empty again: any model may fill it
    assert torch.equal(_generate(model, inputs, **cache_kwargs(model, cache)), expected)


@torch.no_grad()
def test_static_buffers_of_withdrawn_layers_hold_only_kept_slots(llava):
    """By hand: after a prefill withdrawn at layer 2, layers 2.. hold only the text slots (the longest row's) at the
    front of static buffers sized for them plus the new tokens; layers 0-1 hold the whole prompt in full-length
    buffers. ``reset()`` gives every layer its full length back."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    length, new = inputs["input_ids"].shape[1], 3
    cache = StaticCache(config=model.config, max_cache_len=length + new)
    media = llava.media_mask(inputs)
    text_slots = int((inputs["attention_mask"].bool() & ~media).sum(1).max())
    with vtexit.withdraw(model, layer=2):
        model(**inputs, **cache_kwargs(model, cache), use_cache=True)
        lengths = [int(layer.cumulative_length) for layer in cache.layers]
    assert lengths[:2] == [length, length]
    assert lengths[2:] == [text_slots] * (len(lengths) - 2)
    slots = [layer.keys.shape[2] for layer in cache.layers]
    assert slots == [length + new] * 2 + [text_slots + new] * (len(slots) - 2)
    assert [layer.values.shape[2] for layer in cache.layers] == slots
    cache.reset()
    assert all(layer.max_cache_len == length + new for layer in cache.layers)
    assert all(layer.keys is None or layer.keys.shape[2] == length + new for layer in cache.layers)


@torch.no_grad()
def test_static_buffers_after_a_reduction_before_the_language_model(llava):
    """By hand: after a DivPrune prefill every layer, layer 0 too, holds the longest row's kept slots (its text and
    the rounded share of its visual tokens) in buffers sized for them plus the new tokens; ``reset()`` gives every
    layer its full length back and the cache then serves the unpatched model."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    length, new = inputs["input_ids"].shape[1], NEW_TOKENS
    cache = StaticCache(config=model.config, max_cache_len=length + new)
    real = inputs["attention_mask"].bool()
    media = llava.media_mask(inputs) & real
    kept = max(int((real & ~media)[b].sum()) + keep_count(int(media[b].sum()), 0.3) for b in range(2))
    with vtexit.divprune(model, keep=0.3):
        model(**inputs, **cache_kwargs(model, cache), use_cache=True)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [kept] * len(cache.layers)
    assert [layer.keys.shape[2] for layer in cache.layers] == [kept + new] * len(cache.layers)
    cache.reset()
    assert all(layer.max_cache_len == length + new for layer in cache.layers)
    unpatched = _generate(model, inputs)
    assert torch.equal(_generate(model, inputs, **cache_kwargs(model, cache)), unpatched)


@torch.no_grad()
def test_a_reset_static_cache_is_reused_with_the_same_buffers(llava):
    """A static cache reset and passed again: the next patched prefill takes the withdrawn layers' small buffers back
    (the same tensors, as CUDA graphs need), and an unpatched run in between gets full-length layers."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS)
    unpatched = _generate(model, inputs)
    with vtexit.withdraw(model, layer=2):
        first = _generate(model, inputs, **cache_kwargs(model, cache))
        pointers = [layer.keys.data_ptr() for layer in cache.layers]
        cache.reset()
        again = _generate(model, inputs, **cache_kwargs(model, cache))
        assert [layer.keys.data_ptr() for layer in cache.layers] == pointers
    cache.reset()
    assert torch.equal(_generate(model, inputs, **cache_kwargs(model, cache)), unpatched)
    assert all(layer.keys.shape[2] == cache.get_max_length() for layer in cache.layers)
    cache.reset()
    with vtexit.withdraw(model, layer=2):
        assert torch.equal(_generate(model, inputs, **cache_kwargs(model, cache)), first)
    assert torch.equal(again, first)


@torch.no_grad()
def test_static_decode_masks_hide_the_withdrawn_slots(llava):
    """A prefill and decode steps on a static cache of withdrawn layers give the dynamic cache's logits."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    with vtexit.withdraw(model, layer=2):
        kept = dict(output_logits=True, return_dict_in_generate=True)
        static = _generate(model, inputs, cache_implementation="static", **kept)
        dynamic = _generate(model, inputs, **kept)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_static_decode_cost_records(llava):
    """Eager static decode steps record all slots of each layer's buffers as keys (a static decode computes them,
    masked): max_cache_len in layers 0-1, the kept text slots plus the new tokens after the withdrawal; compiled
    steps run no Python and record nothing; the prefill record is the same either way."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    cache_len = inputs["input_ids"].shape[1] + NEW_TOKENS
    text_slots = int((inputs["attention_mask"].bool() & ~llava.media_mask(inputs)).sum(1).max())
    n = model.config.get_text_config().num_hidden_layers
    expected_keys = [cache_len] * 2 + [text_slots + NEW_TOKENS] * (n - 2)
    with vtexit.withdraw(model, layer=2) as handle:
        _generate(model, inputs, **cache_kwargs(model, StaticCache(config=model.config, max_cache_len=cache_len)))
        eager = handle.last_cost
        torch._dynamo.reset()
        _generate(model, inputs, cache_implementation="static", compile_config=_compiled_decode())
        compiled = handle.last_cost
    assert len(eager.decode) == NEW_TOKENS - 1
    for step in eager.decode:
        assert [sorted(set(layer.keys.tolist())) for layer in step.layers] == [[k] for k in expected_keys]
    assert compiled.decode == []
    for a, b in zip(eager.prefill.layers, compiled.prefill.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.visual_queries, b.visual_queries)


@torch.no_grad()
def test_a_copy_of_a_model_that_compiled_its_decode_decodes_with_its_own_patch(llava):
    """transformers keeps the compiled forward on the model (bound to it) and ``copy.deepcopy`` copies it: a patched
    copy must not decode with the original's unpatched forward."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    torch._dynamo.reset()
    _generate(model, inputs, cache_implementation="static", compile_config=_compiled_decode())  # compiles decode
    patched = copy.deepcopy(model)
    with vtexit.withdraw(patched, layer=2):
        dynamic = _generate(patched, inputs)
        compiled = _generate(patched, inputs, cache_implementation="static", compile_config=_compiled_decode())
    assert torch.equal(compiled, dynamic)
