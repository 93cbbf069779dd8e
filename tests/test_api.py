"""Bad input, side-by-side patches, calibration and FLOPs, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import vtexit
from vtexit.core.flops import DecoderShape, count, withdrawal_tokens
from vtexit.core.transformers_compat import cache_kwargs, output_cache
from vtexit.methods.vtw.calibrate import calibrate
from vtexit.testing.tiny_models import build_tiny


def _hooks(model) -> dict:
    """Every forward (pre-)hook on the model; transformers itself installs some on first use."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.named_modules()}


def _untouched(model, hooks_before: dict | None = None) -> bool:
    """No vtexit hook or marker left (hooks transformers installed itself are allowed)."""
    if hasattr(model, "_vtexit_engine"):
        return False
    if hooks_before is not None:
        return _hooks(model) == hooks_before
    decoder_layers = model.model.language_model.layers if hasattr(model.model, "language_model") else []
    return all(not layer._forward_pre_hooks for layer in decoder_layers) and not model._forward_pre_hooks


@pytest.fixture(scope="module")
def llava():
    case = build_tiny("llava", num_layers=6)
    case.model.generation_config.eos_token_id = None
    return case


@pytest.mark.parametrize("layer", [0, -1, 7, 2.0, "3", True, None])
def test_bad_layer_is_refused_and_model_untouched(llava, layer):
    with pytest.raises(ValueError, match="layer"):
        vtexit.withdraw(llava.model, layer=layer)
    assert _untouched(llava.model)


def test_family_minimum_layers():
    qwen3 = build_tiny("qwen3_vl")
    deepstack = len(qwen3.model.config.vision_config.deepstack_visual_indexes)
    assert vtexit.valid_layer_range(qwen3.model)[0] == max(1, deepstack)
    if deepstack > 1:
        with pytest.raises(ValueError, match="deepstack"):
            vtexit.withdraw(qwen3.model, layer=deepstack - 1)
    gemma = build_tiny("gemma3")
    types = gemma.model.config.get_text_config().layer_types
    first_full = types.index("full_attention")
    assert vtexit.valid_layer_range(gemma.model)[0] == max(first_full, types.index("sliding_attention")) + 1
    with pytest.raises(ValueError, match="layer"):
        vtexit.withdraw(gemma.model, layer=first_full)
    assert _untouched(gemma.model)


def test_unknown_family_lists_supported():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="llava.*register_family"):
        vtexit.withdraw(model, layer=1)
    assert _untouched(model)


def test_model_without_media_token_ids_is_refused(llava):
    family = vtexit.FamilySpec("no-media", ("llava",), media_token_attrs=("not_an_attribute",))
    with pytest.raises(ValueError, match="media token id"):
        vtexit.withdraw(llava.model, layer=2, family=family)
    assert _untouched(llava.model)


def test_patching_twice_is_refused(llava):
    with vtexit.withdraw(llava.model, layer=2):
        with pytest.raises(ValueError, match="already patched"):
            vtexit.withdraw(llava.model, layer=3)
    assert _untouched(llava.model)


@torch.no_grad()
def test_call_time_errors_are_clear(llava):
    inputs = llava.inputs([1, 1], text_len=[4, 6])
    embeds = llava.model.get_input_embeddings()(inputs["input_ids"])
    llava.model(**inputs)  # let transformers install its own output-capturing hooks first
    hooks_before = _hooks(llava.model)
    with vtexit.withdraw(llava.model, layer=2):
        with pytest.raises(ValueError, match="inputs_embeds"):
            llava.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        cache = output_cache(llava.model(**inputs, use_cache=True))
        with pytest.raises(ValueError, match="non-empty cache"):
            llava.model(**inputs, **cache_kwargs(llava.model, cache))
        prepared = inputs["attention_mask"][:, None, None, :].bool()  # a 4D mask without a static cache
        with pytest.raises(ValueError, match="2D attention_mask"):
            llava.model(**dict(inputs, attention_mask=prepared))
        static = StaticCache(config=llava.model.config, max_cache_len=64)
        llava.model(**inputs, **cache_kwargs(llava.model, static))
        with pytest.raises(ValueError, match="non-empty static cache"):
            llava.model(**inputs, **cache_kwargs(llava.model, static))
    assert _untouched(llava.model, hooks_before)


@torch.no_grad()
def test_two_models_patched_differently_side_by_side():
    a, b = build_tiny("llava", num_layers=6, seed=0), build_tiny("llava", num_layers=6, seed=0)
    inputs = a.inputs([1, 2], text_len=[5, 3])
    with vtexit.withdraw(a.model, layer=2), vtexit.withdraw(b.model, layer=5):
        out_a, out_b = a.model(**inputs).logits, b.model(**inputs).logits
    with vtexit.withdraw(a.model, layer=2):
        alone_a = a.model(**inputs).logits
    with vtexit.withdraw(b.model, layer=5):
        alone_b = b.model(**inputs).logits
    assert torch.equal(out_a, alone_a) and torch.equal(out_b, alone_b)
    assert not torch.allclose(out_a[:, -1], out_b[:, -1])


@torch.no_grad()
def test_calibration_matches_brute_force(llava):
    batches = [llava.inputs([1, 0, 2], text_len=[5, 9, 3], seed=s) for s in range(2)]
    result = calibrate(llava.model, batches, eta=0.0, progress=False)
    low, n = vtexit.valid_layer_range(llava.model)
    assert sorted(result.kl) == list(range(low, n + 1))
    for k in range(low, n):
        values = []
        for batch in batches:
            full = llava.model(**batch).logits[:, -1].log_softmax(-1)
            with vtexit.withdraw(llava.model, layer=k):
                withdrawn = llava.model(**batch).logits[:, -1].log_softmax(-1)
            has_image = llava.media_mask(batch).any(1)
            values += (full.exp() * (full - withdrawn)).sum(-1)[has_image].tolist()
        assert result.kl[k] == pytest.approx(sum(values) / len(values), rel=1e-3, abs=1e-7)
    assert result.num_rows == 4  # rows with visual tokens only
    first_below = next(k for k in sorted(result.kl) if result.kl[k] <= 0.0)
    assert result.layer == first_below
    loose = calibrate(llava.model, batches, eta=max(result.kl.values()), progress=False)
    assert loose.layer == low


def test_calibration_rejects_bad_arguments(llava):
    batch = llava.inputs([1], text_len=[4])
    with pytest.raises(ValueError, match="eta"):
        calibrate(llava.model, batch, eta=-1, progress=False)
    with pytest.raises(ValueError, match="samples"):
        calibrate(llava.model, [], progress=False)
    with vtexit.withdraw(llava.model, layer=2):
        with pytest.raises(ValueError, match="unpatched"):
            calibrate(llava.model, batch, progress=False)


def test_flops_reduce_to_fastv_formula():
    n, d, m = 100, 64, 256
    shape = DecoderShape(hidden=d, heads=4, kv_heads=4, head_dim=16, ffn=m, gated=False, num_layers=2)
    fastv = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert count(shape, [n, n]).prefill == 2 * fastv


def test_flops_of_gqa_gated_model_under_withdrawal(llava):
    shape = DecoderShape.from_model(llava.model)
    text = llava.model.config.get_text_config()
    assert shape.gated and shape.kv_heads == text.num_key_value_heads
    tokens = withdrawal_tokens(shape.num_layers, prompt_tokens=80, visual_tokens=64, layer=2)
    assert tokens == [80, 80] + [16] * (shape.num_layers - 2)
    d, h, kv, dh, m = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn

    def by_hand(n, c):
        return n * d * h * dh * 2 + n * d * kv * dh * 2 + 2 * n * c * h * dh + 3 * n * d * m

    flops = count(shape, tokens)
    assert flops.prefill == sum(by_hand(t, t) for t in tokens)
    assert flops.decode_per_token == sum(by_hand(1, t + 1) for t in tokens)
    with pytest.raises(ValueError, match="visual_tokens"):
        withdrawal_tokens(4, prompt_tokens=10, visual_tokens=11, layer=2)


class _ForceTokenAt:
    """Logits processor that forces `token` at generation step `step` (to emit an image token id)."""

    def __init__(self, token: int, step: int, prompt_length: int):
        self.token, self.step, self.prompt_length = token, step, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0
        return scores


@torch.no_grad()
def test_generated_image_token_id_is_treated_as_text(llava):
    from transformers import LogitsProcessorList

    inputs = llava.inputs([1, 2], text_len=[5, 3])
    media = llava.media_mask(inputs)
    prompt = inputs["input_ids"].shape[1]
    image_id = llava.model.config.image_token_id
    force = LogitsProcessorList([_ForceTokenAt(image_id, step=1, prompt_length=prompt)])
    with vtexit.withdraw(llava.model, layer=3):
        out = llava.model.generate(
            **inputs, max_new_tokens=4, do_sample=False, logits_processor=force, return_dict_in_generate=True
        )
    assert (out.sequences[:, prompt + 1] == image_id).all()
    kept = int((inputs["attention_mask"].bool() & ~media).sum(1).max())
    cache = output_cache(out)
    # 4 new tokens, the last one never fed back: every layer cached 3 decode positions, none dropped.
    assert cache.layers[0].keys.shape[-2] == prompt + 3
    assert cache.layers[3].keys.shape[-2] == kept + 3


def test_cli_runs_on_tiny_model(tmp_path):
    from typer.testing import CliRunner

    from vtexit.app.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--model", "tiny", "--rows", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "withdraw visual tokens at K =" in result.output
    assert (tmp_path / "kl.json").exists() and (tmp_path / "kl_curve.png").stat().st_size > 10_000
    result = runner.invoke(
        app, ["flops", "--model", "tiny", "--layer", "0", "--prompt-tokens", "9", "--visual-tokens", "4"]
    )
    assert result.exit_code != 0 and "layer must be in" in result.output


def test_benchmark_reports_kv_bytes_of_the_tokens_each_layer_keeps(llava):
    from vtexit.evaluation.bench import bench_withdrawal

    inputs = llava.inputs([2], text_len=[6])
    rows = bench_withdrawal(llava.model, inputs, [2], repeats=1, new_tokens=2, warmup=0, progress=False)
    base, vtw = rows
    text = llava.model.config.get_text_config()
    length, visual = inputs["input_ids"].shape[1], int(llava.media_mask(inputs).sum())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_key_value_heads * head_dim * 4  # keys + values, float32
    assert base.kv_bytes_per_layer == (length * per_token,) * text.num_hidden_layers
    assert vtw.kv_bytes_per_layer == (length * per_token,) * 2 + ((length - visual) * per_token,) * 4
    assert vtw.prefill_flops < base.prefill_flops and vtw.decode_flops < base.decode_flops
    # Timings are reported, not judged here (benchmarks compare them): each is a finite number of seconds.
    assert all(math.isfinite(t) for r in rows for t in (r.lm_prefill_s, r.prefill_s, r.decode_token_s))


def test_every_builtin_family_has_a_tiny_model():
    from vtexit.core.families import builtin_families, family_for
    from vtexit.testing.tiny_models import FAMILIES

    covered = {family_for(build_tiny(name, num_layers=2).model).name for name in FAMILIES}
    assert covered == {spec.name for spec in builtin_families()}


def test_lazy_exports_are_the_objects_the_type_checking_imports_name():
    """``vtexit/__init__.py`` imports its exports on first use: its ``_HOMES``, the imports type checkers read and
    ``__all__`` agree, each export is its home module's object, and ``dir`` shows what the eager imports showed."""
    import ast
    import importlib
    import inspect

    tree = ast.parse(inspect.getsource(vtexit))
    typed = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module.startswith("vtexit.")
        for alias in node.names
    }
    homes = {name: module for module, names in vtexit._HOMES.items() for name in names}
    assert typed == homes
    assert sorted(homes) == sorted(vtexit.__all__) and len(set(vtexit.__all__)) == len(vtexit.__all__)
    for name in vtexit.__all__:
        assert getattr(vtexit, name) is getattr(importlib.import_module(homes[name]), name), name
    shown = dir(vtexit)
    assert set(vtexit.__all__) | {"core", "methods", "__all__", "__path__"} <= set(shown)
    assert not [name for name in shown if name.startswith("_") and not name.startswith("__")]
    assert "TYPE_CHECKING" not in shown and "__getattr__" not in shown
    assert vtexit.core.families.family_for is not None  # subpackages reachable after a plain `import vtexit`
    with pytest.raises(AttributeError, match="no attribute 'no_such_export'"):
        vtexit.no_such_export  # noqa: B018


def test_apply_takes_a_config_or_its_dict(llava):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    with vtexit.apply(llava.model, vtexit.VTWConfig(layer=2)):
        by_config = llava.model(**inputs).logits
    with vtexit.apply(llava.model, {"method": "vtw", "layer": 2}) as handle:
        by_dict = llava.model(**inputs).logits
        assert handle.config == vtexit.VTWConfig(layer=2)
    with vtexit.apply(llava.model, {"method": "fastv", "layer": "2", "keep": "0.5"}) as handle:  # strings convert
        assert handle.config == vtexit.FastVConfig(layer=2, keep=0.5)
    assert torch.equal(by_config, by_dict) and _untouched(llava.model)
    with pytest.raises(ValueError, match="missing required setting 'layer' for method 'vtw'"):
        vtexit.apply(llava.model, {"method": "vtw"})
    with pytest.raises(ValueError, match="method must be one of"):
        vtexit.apply(llava.model, {"method": "nope"})
    with pytest.raises(ValueError, match="config must be a vtexit method config or its dict"):
        vtexit.apply(llava.model, "vtw")
    assert _untouched(llava.model)


def test_apply_of_dicts_sits_above_the_methods_and_patch_imports_no_registry():
    """methods/patch.py is imported by every method package; the registry imports every method: patch must not
    import the registry (an import circle), so the dict-taking ``vtexit.apply`` lives in the registry."""
    import subprocess
    import sys

    from vtexit.methods import patch, registry

    assert vtexit.apply is registry.apply and registry.apply is not patch.apply
    assert vtexit.load_default is __import__("vtexit.default_model", fromlist=["x"]).load_default
    for first, then in [("vtexit.methods.patch", "vtexit.methods.registry"), ("vtexit.methods.registry", "vtexit")]:
        # each imported first in a fresh interpreter: a circle through it would fail here
        code = f"import {first}, sys; print('vtexit.methods.registry' in sys.modules); import {then}; {then}.apply"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == str(first != "vtexit.methods.patch")  # patch alone does not pull in the registry
