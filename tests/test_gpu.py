"""The GPU check: the family exactness checks on CUDA against the CPU, and the generate path that once crashed
there. Skipped where no CUDA device is present (CI); ``make gpu-check`` runs it with the speed benchmark."""

from __future__ import annotations

import pytest
import torch
from conftest import family_batch

import vtexit
from vtexit.core.transformers_compat import forget_compiled_call
from vtexit.evaluation.speed import call_peak_bytes, cudagraph_skips, resident_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 without TF32, so CUDA matmuls match the CPU to float rounding."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _on(inputs: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@torch.no_grad()
def test_withdrawn_logits_and_generate_on_cuda_match_the_cpu(case):
    inputs = family_batch(case)
    low, n = vtexit.valid_layer_range(case.model)
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    generate = dict(max_new_tokens=4, do_sample=False, suppress_tokens=media_ids)
    expected = {}
    for k in sorted({low, (low + n) // 2}):
        with vtexit.withdraw(case.model, layer=k):
            expected[k] = (case.model(**inputs).logits, case.model.generate(**inputs, **generate))
    base_cpu = case.model(**inputs).logits
    model = case.model.to("cuda")
    try:
        cuda_inputs = _on(inputs, "cuda")
        base = model(**cuda_inputs).logits
        torch.testing.assert_close(base.cpu(), base_cpu, atol=1e-4, rtol=1e-4)
        with vtexit.withdraw(model, layer=n):
            assert torch.equal(model(**cuda_inputs).logits, base)  # K = N: bit-identical on CUDA too
        for k, (logits, tokens) in expected.items():
            with vtexit.withdraw(model, layer=k) as handle:
                got = model(**cuda_inputs).logits
                assert handle.last_layout.index.device.type == "cuda"
                torch.testing.assert_close(got.cpu(), logits, atol=1e-4, rtol=1e-4, msg=f"K={k}")
                assert torch.equal(model.generate(**cuda_inputs, **generate).cpu(), tokens), f"K={k}"
                assert all(layer.keys.device.type == "cuda" for layer in handle.last_cost.prefill.layers)
    finally:
        case.model.to("cpu")


# How YOPO runs on CUDA: split with the FlexAttention window (compiled), split with tiles, and the default at this
# size (dense: fewer visual rows than dense_below). The CPU reference runs split with tiles.
EXECUTIONS = {"split-flex": dict(dense_below=0), "split-tiles": dict(dense_below=0, window_kernel="tiles"), "dense": {}}


@torch.no_grad()
@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_yopo_on_cuda_matches_the_cpu(family, execution):
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny(family, num_layers=4)
    inputs = family_batch(case)
    heads = case.model.config.get_text_config().num_attention_heads
    active = torch.ones(4, heads, dtype=torch.bool)
    active[2:, ::2] = False
    config = vtexit.YOPOConfig(window=3, heads=active, layer_drop=3, ffn_ratio=2, **EXECUTIONS[execution])
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    generate = dict(max_new_tokens=4, do_sample=False, suppress_tokens=media_ids)
    with vtexit.yopo(case.model, config):
        logits, tokens = case.model(**inputs).logits, case.model.generate(**inputs, **generate)
    model = case.model.to("cuda")
    try:
        cuda_inputs = _on(inputs, "cuda")
        with vtexit.yopo(model, config) as handle:
            torch.testing.assert_close(model(**cuda_inputs).logits.cpu(), logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(model.generate(**cuda_inputs, **generate).cpu(), tokens)
            first = handle.last_cost.prefill.layers[0]
            if execution == "dense":
                assert first.head_fraction == 1.0 and first.ffn_fraction == 1.0  # the full computation ran
            else:
                assert first.visual_keys.device.type == "cuda"
    finally:
        case.model.to("cpu")


@torch.no_grad()
@pytest.mark.parametrize(
    "family, config",
    [
        ("llava", vtexit.VTWConfig(layer=2)),
        ("qwen2_vl", vtexit.VTWConfig(layer=2)),
        ("llava", vtexit.DivPruneConfig(keep=0.3)),  # every layer's cache holds the reduced prompt, layer 0 too
    ],
    ids=["llava-vtw", "qwen2_vl-vtw", "llava-divprune"],
)
def test_static_cache_and_compiled_decode_on_cuda_match_the_cpu(family, config):
    """transformers' own static cache + compiled decode on CUDA (inductor, CUDA graphs) under VTW or a reduction
    before the language model: the CPU's dynamic-cache tokens, and no recompilation on a second generate."""
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny(family, num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    inputs = family_batch(case)
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    generate = dict(max_new_tokens=6, do_sample=False, suppress_tokens=media_ids)
    with vtexit.apply(case.model, config):
        expected = case.model.generate(**inputs, **generate)
    model = case.model.to("cuda")
    try:
        cuda_inputs = _on(inputs, "cuda")
        torch._dynamo.reset()
        before = cudagraph_skips()
        model.generate(**cuda_inputs, cache_implementation="static", **generate)
        unpatched_skips = cudagraph_skips() - before
        forget_compiled_call(model)  # the unpatched compiled decode (patching drops it too)
        torch._dynamo.reset()
        before = cudagraph_skips()
        with vtexit.apply(model, config):
            first = model.generate(**cuda_inputs, cache_implementation="static", **generate)
            assert hasattr(model, "_compiled_call")  # generate compiled its decode step on CUDA
            # the patched decode runs under CUDA graphs wherever transformers' own does (a skip relaunches every
            # kernel from the host at each step)
            assert cudagraph_skips() - before == unpatched_skips
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = model.generate(**cuda_inputs, cache_implementation="static", **generate)
        assert torch.equal(first.cpu(), expected)
        assert torch.equal(second.cpu(), expected)
    finally:
        case.model.to("cpu")
        torch._dynamo.reset()


def test_deferred_stop_checks_keep_the_static_compiled_tokens_on_cuda():
    """``bench_speed.py --deferred-stop``: generate reading its stop flag one step late on CUDA (no host sync per
    step) gives the tokens of the usual loop, under VTW on the static cache with the compiled decode."""
    from vtexit.core.transformers_compat import deferred_stop_checks
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    model = case.model.to("cuda")
    try:
        inputs = _on(family_batch(case), "cuda")
        generate = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
        with vtexit.withdraw(model, layer=2):
            expected = model.generate(**inputs, **generate)
            with deferred_stop_checks():
                deferred = model.generate(**inputs, **generate)
        assert torch.equal(deferred, expected)
    finally:
        case.model.to("cpu")
        torch._dynamo.reset()


@torch.no_grad()
def test_whole_model_compile_with_cuda_graphs_equals_eager():
    """``torch.compile(model, mode="reduce-overhead")`` at batch 1 under VTW: the patched model's graphs run under CUDA
    graphs wherever the unpatched model's do, and the logits equal the eager patched model's (the traced plan's shapes
    are fixed)."""
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny("llava", num_layers=4)
    model = case.model.to("cuda")
    try:
        inputs = _on(case.inputs([1], text_len=6), "cuda")
        forward = dict(use_cache=False)
        skips = {}
        with vtexit.withdraw(model, layer=2):
            eager = model(**inputs, **forward).logits
        for name, patch in (("unpatched", None), ("patched", 2)):
            torch._dynamo.reset()
            handle = vtexit.withdraw(model, layer=patch) if patch is not None else None
            try:
                compiled = torch.compile(model, mode="reduce-overhead")
                before = cudagraph_skips()
                for _ in range(3):  # warm-up, record, replay
                    logits = compiled(**inputs, **forward).logits.clone()
                skips[name] = cudagraph_skips() - before
            finally:
                if handle is not None:
                    handle.remove()
        assert skips["patched"] == skips["unpatched"]
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)
    finally:
        case.model.to("cpu")
        torch._dynamo.reset()


@torch.no_grad()
def test_peak_memory_leaves_out_other_models_on_the_device():
    """The benchmark's peak of a generate is the model's own weights plus what the call allocated: a second copy of
    the weights on the device does not count, the cache it builds does."""
    import copy

    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny("llava", num_layers=4)
    model = case.model.to("cuda")
    other = copy.deepcopy(model)
    try:
        inputs = _on(case.inputs([1, 1], text_len=6), "cuda")
        generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
        out = model.generate(**inputs, **generate, return_dict_in_generate=True)
        from vtexit.core.transformers_compat import kv_bytes_per_layer, output_cache

        kv = sum(kv_bytes_per_layer(output_cache(out)))
        del out
        weights = resident_bytes(model)
        copy_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in other.parameters()}.values())
        peak = call_peak_bytes(lambda: model.generate(**inputs, **generate), model, torch.device("cuda"))
        assert peak >= weights + kv  # the model's weights and the cache it built
        assert peak <= torch.cuda.max_memory_allocated() - copy_bytes  # the copy's weights are left out
    finally:
        del other
        case.model.to("cpu")
