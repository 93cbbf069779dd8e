"""transformers moves under vtexit: the tested range is declared in one place, a release outside it is named at patch
time, the cache is found however a release passes it, and a cache the engine cannot see is a loud error.

References: the installed transformers' own behaviour (its layers called with the cache keyword vtexit chose, under
warnings-as-errors), the unpatched model, and the project's own declarations (pyproject.toml, Makefile).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import family_batch
from packaging.specifiers import SpecifierSet
from transformers import DynamicCache

import vtexit
from vtexit.core import torch_support
from vtexit.core import transformers_compat as compat
from vtexit.core.families import family_for
from vtexit.testing.tiny_models import FAMILIES, build_tiny

ROOT = Path(__file__).resolve().parents[1]


def test_the_tested_range_is_declared_once_and_holds_the_installed_release():
    requirement = re.search(r'^\s*"transformers([^"]+)",$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    declared = SpecifierSet(requirement)
    assert declared == SpecifierSet(f">={compat.TESTED_FLOOR},<{compat.TESTED_NEXT}")
    floor = re.search(r"^TRANSFORMERS_FLOOR := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert floor == compat.TESTED_FLOOR
    pinned = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pinned in declared
    # Fails on a release outside the range (the canary's first message when transformers moves on).
    assert sys.modules["transformers"].__version__ in declared


@pytest.mark.parametrize("version", ["5.16.0", "5.26.0", "6.0.0"])
def test_a_release_outside_the_range_gets_one_clear_warning_at_patch_time(llava4, monkeypatch, version):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    try:
        expected = rf"tested with transformers >={compat.TESTED_FLOOR},<{compat.TESTED_NEXT}"
        with pytest.warns(UserWarning, match=expected):
            vtexit.withdraw(llava4.model, layer=2)
    finally:
        vtexit.patch_of(llava4.model).remove()


def test_a_release_inside_the_range_patches_silently(llava4, monkeypatch):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", compat.TESTED_FLOOR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vtexit.withdraw(llava4.model, layer=2).remove()


def test_the_torch_floor_is_declared_once_and_holds_the_installed_torch():
    requirement = re.search(r'^\s*"torch([^"]+)",', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert SpecifierSet(requirement) == SpecifierSet(f">={torch_support.TESTED_TORCH_FLOOR}")
    floor = re.search(r"^TORCH_FLOOR := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert floor in SpecifierSet(requirement) and floor.startswith(f"{torch_support.TESTED_TORCH_FLOOR}.")
    assert torch_support.check_tested_torch()


@pytest.mark.parametrize("version", ["2.6.0", "2.8.0+cu128"])
def test_an_older_torch_gets_one_clear_warning_at_patch_time(llava4, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    try:
        with pytest.warns(UserWarning, match=rf"tested with torch>={torch_support.TESTED_TORCH_FLOOR}; found"):
            vtexit.withdraw(llava4.model, layer=2)
    finally:
        monkeypatch.undo()
        vtexit.patch_of(llava4.model).remove()


def test_the_cache_is_found_under_either_name_or_by_type():
    cache = DynamicCache()
    assert compat.find_cache({"cache": cache, "use_cache": True}) is cache
    assert compat.find_cache({"past_key_values": cache}) is cache
    assert compat.find_cache({"kv_state": cache, "position_ids": None}) is cache  # a future rename
    assert compat.find_cache({"use_cache": True, "attention_mask": None}) is None
    kwargs = {"past_key_values": cache, "cache": None, "use_cache": True}
    assert compat.take_cache(kwargs) is cache and kwargs == {"use_cache": True}


@torch.no_grad()
def test_a_layer_called_with_the_chosen_keyword_uses_the_cache_and_warns_nothing(llava4):
    """The installed release's decoder layer writes its keys to the cache passed under ``with_cache``'s name."""
    model = llava4.model
    inputs = llava4.inputs([1], text_len=[4])
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    layer = model.model.language_model.layers[1]
    hook = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    hidden = seen.pop("hidden")
    seen.pop("hidden_states", None)
    cache = DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(hidden, **compat.with_cache(seen, layer, cache))
    assert cache.get_seq_length(1) == hidden.shape[1]


@torch.no_grad()
def test_output_cache_reads_the_returned_cache_without_deprecation(llava4):
    out = llava4.model(**llava4.inputs([1], text_len=[4]), use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = compat.output_cache(out)
    assert isinstance(cache, compat.Cache) and cache.get_seq_length() == out.logits.shape[1]


def _hide_cache_from_the_core(model):
    """Simulate a release that hands the text model its cache in a way the core's hook cannot see: the cache is
    taken out of the core's kwargs before vtexit's hook and put back for the text model."""
    held = {}

    def hide(module, args, kwargs):
        held["cache"] = compat.take_cache(kwargs)
        return args, kwargs

    def give_back(module, args, kwargs):
        if held.get("cache") is not None:
            kwargs[compat.cache_keyword(module)] = held["cache"]
        return args, kwargs

    return [
        model.model.register_forward_pre_hook(hide, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(give_back, with_kwargs=True),
    ]


@torch.no_grad()
def test_a_compacted_cache_the_core_did_not_see_is_a_loud_error(llava4):
    model = llava4.model
    inputs = llava4.inputs([1, 2], text_len=[4, 6])
    hooks = _hide_cache_from_the_core(model)  # registered first: they run before vtexit's hooks
    try:
        with vtexit.withdraw(model, layer=2):
            with pytest.raises(RuntimeError, match="did not see the cache"):
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("family", ["llava", "gemma3"])  # Gemma3's layers get no use_cache: the core's is read
@torch.no_grad()
def test_a_layer_that_gets_no_cache_with_use_cache_on_is_a_loud_error(family):
    torch.manual_seed(0)
    case = build_tiny(family)
    model = case.model
    layer_k = vtexit.valid_layer_range(model)[0]

    def drop_cache(module, args, kwargs):
        compat.take_cache(kwargs)
        return args, kwargs

    layer = family_for(model).resolve(model).layers[layer_k]
    hook = layer.register_forward_pre_hook(drop_cache, with_kwargs=True)  # runs before vtexit's layer hook
    try:
        with vtexit.withdraw(model, layer=layer_k):
            with pytest.raises(RuntimeError, match="found no cache"):
                model(**family_batch(case), use_cache=True)
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_decoder_layers_get_the_kwargs_the_engine_rewrites(family):
    """The per-layer contract the engine relies on (transformers_compat.LAYER_KWARGS), as this release's text model
    really calls its layers: the canary's clearest message when a release changes it."""
    torch.manual_seed(0)
    case = build_tiny(family)
    inputs = family_batch(case)
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    layer = family_for(case.model).resolve(case.model).layers[1]
    hook = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        case.model(**inputs, use_cache=True)
    finally:
        hook.remove()
    batch, length = inputs["input_ids"].shape
    assert seen["hidden"].shape[:2] == (batch, length)
    assert set(compat.LAYER_KWARGS) <= set(seen)
    assert seen.get("use_cache", True) is True and isinstance(compat.find_cache(seen), compat.Cache)
    cos, sin = seen["position_embeddings"]
    assert cos.shape[-2] == sin.shape[-2] == length
    assert seen["position_ids"] is None or seen["position_ids"].shape[-1] == length
    mask = seen["attention_mask"]
    assert mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] == length)


def test_deferred_stop_checks_allow_the_device_inside_the_block_only():
    """The benchmarks' switch for generate's deferred stop check: inside the block transformers allows it on CUDA under
    its own conditions (a cache it cannot crop must not be returned), elsewhere as before; restored on exit, even on
    an error (transformers' own answers outside are the reference)."""
    from transformers.generation.utils import DeferredStopCheck

    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    class Uncroppable:
        is_croppable = False

    before = [DeferredStopCheck.is_supported(d, None, False, is_assistant=False) for d in (cuda, cpu)]
    assert before == [False, False]
    with pytest.raises(RuntimeError, match="inside"), compat.deferred_stop_checks():
        assert DeferredStopCheck.is_supported(cuda, None, False, is_assistant=False)
        assert not DeferredStopCheck.is_supported(cuda, None, False, is_assistant=True)
        assert not DeferredStopCheck.is_supported(cuda, Uncroppable(), True, is_assistant=False)
        assert DeferredStopCheck.is_supported(cuda, Uncroppable(), False, is_assistant=False)
        assert not DeferredStopCheck.is_supported(cpu, None, False, is_assistant=False)
        raise RuntimeError("inside")
    assert [DeferredStopCheck.is_supported(d, None, False, is_assistant=False) for d in (cuda, cpu)] == before
