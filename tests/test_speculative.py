"""Speculative decoding under every method: prompt lookup and an assistant model give the tokens of plain greedy
decoding under the same patch.

The first call of speculative decoding fills the cache with the prompt *and* the first draft tokens, and rejected
drafts are cropped from the cache afterwards. The reference is plain greedy ``generate`` of the same patched model,
which prefills the prompt alone: a method that ranked by the last draft token, or a record that did not follow the
cropped cache, gives other tokens (or fails).
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtexit
from vtexit.methods.dyvte.gates import DyVTEGates, GatesConfig
from vtexit.testing.tiny_models import build_tiny

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def llava():
    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


def _repeating_prompt(case) -> dict:
    """One image between text whose last tokens occur earlier in the prompt, so that prompt lookup drafts from the
    first step on (and the random model rejects most drafts)."""
    inputs = case.inputs([1], text_len=14)  # 7 text tokens after the image
    ids = inputs["input_ids"].clone()
    low, high = case.text_id_range
    pattern = torch.tensor([low, low + 1, low + 2])
    ids[0, -6:] = torch.cat([pattern, pattern])
    inputs["input_ids"] = ids
    return inputs


def _dyvte(model):
    text = model.config.get_text_config()
    torch.manual_seed(0)
    gates = DyVTEGates(GatesConfig(hidden_size=text.hidden_size, num_layers=4, layers=(1, 2, 3), gate_size=8))
    return vtexit.dyvte(model, gates, threshold=0.5)


METHODS = {
    "vtw": lambda m: vtexit.withdraw(m, layer=2),
    "fastv": lambda m: vtexit.fastv(m, layer=2, keep=0.5),
    "pdrop": lambda m: vtexit.pdrop(m, layers=(1, 2, 3), keep=0.5),
    "random_drop": lambda m: vtexit.random_drop(m, layer=2, keep=0.5),
    "dart": lambda m: vtexit.dart(m, layer=2, keep=0.5),
    "divprune": lambda m: vtexit.divprune(m, keep=0.5),
    "pool": lambda m: vtexit.pool(m, stride=2),
    "visionzip": lambda m: vtexit.visionzip(m, keep=0.5),
    "dyvte": _dyvte,
    "yopo layer drop": lambda m: vtexit.yopo(m, vtexit.YOPOConfig(layer_drop=2)),
    "yopo window, ffn": lambda m: vtexit.yopo(m, vtexit.YOPOConfig(window=3, ffn_ratio=2)),
    "hybrid": lambda m: vtexit.hybrid(m, pre={"method": "divprune", "keep": 0.5}, then={"method": "vtw", "layer": 3}),
}


def _prompt_lookup(model, inputs) -> tuple[torch.Tensor, list[int]]:
    """``generate`` with prompt lookup, and the lengths of its calls that reached the language model with an empty
    cache (the prompt plus the first drafts, when the case under test arises)."""
    lengths = []

    def note(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if ids is not None and (cache is None or cache.get_seq_length() == 0):
            lengths.append(ids.shape[1])

    handle = model.model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, prompt_lookup_num_tokens=3)
    finally:
        handle.remove()
    return tokens, lengths


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_speculative_decoding_gives_the_greedy_tokens(llava, method):
    model = llava.model
    inputs = _repeating_prompt(llava)
    assistant = copy.deepcopy(model)  # an unpatched draft model
    handle = METHODS[method](model)
    try:
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        lookup, lengths = _prompt_lookup(model, inputs)
        assisted = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, assistant_model=assistant)
    finally:
        handle.remove()
    prompt = inputs["input_ids"].shape[1]
    assert lengths == [prompt + 3]  # the first call verified drafts with the prompt: the case under test
    assert torch.equal(lookup, greedy)
    assert torch.equal(assisted, greedy)


@torch.no_grad()
def test_generate_is_the_models_own_again_after_remove(llava):
    model = llava.model
    handle = vtexit.withdraw(model, layer=2)
    assert "generate" in model.__dict__
    handle.remove()
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "internvl", "idefics3", "llava_next"])
@pytest.mark.parametrize("method", ["vtw", "fastv"])
@torch.no_grad()
def test_prompt_lookup_gives_the_greedy_tokens_on_other_families(family, method):
    """Multimodal RoPE (Qwen2-VL), bidirectional image blocks (Gemma3), tiles (InternVL, Idefics3, LLaVA-NeXT)."""
    case = build_tiny(family, num_layers=4)
    model = case.model
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = _repeating_prompt(case)
    layer = vtexit.valid_layer_range(model)[0] + 1
    patch = vtexit.withdraw(model, layer=layer) if method == "vtw" else vtexit.fastv(model, layer=layer, keep=0.5)
    with patch:
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        lookup, lengths = _prompt_lookup(model, inputs)
    assert lengths == [inputs["input_ids"].shape[1] + 3]
    assert torch.equal(lookup, greedy)
