"""VTW inside vLLM's decoder equals ``vtexit.withdraw(model, layer=K)`` on transformers (same weights, float32):
greedy tokens and every step's top-20 logprobs, for several K, a batch with different images, no image and two
images, a hybrid (pool before the LLM, then VTW), a stress run whose chunked prefill splits images while requests
join mid-decode, and a run where vLLM preempts requests for lack of KV blocks. Controls: the stock model and a wrong
K are far off. Settings VTW cannot run exactly under are refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny_vllm import (
    ATOL,
    Reference,
    Request,
    _rename_tower_keys,
    compare,
    first_step_gap,
    images,
    make_llm,
    record_steps,
    recorded_steps,
    reference,
    sampling,
)

import vtexit
from vtexit.integrations.vllm.withdrawal import split_setting
from vtexit.testing import build_tiny
from vtexit.testing.tiny_folder import make_processor

LAYERS = 4  # decoder layers of the tiny model: K in 1..3 withdraws, K = 4 is the stock model
NO_CACHE = {"enable_prefix_caching": False}


def save_tiny_llava(folder: Path, seed: int = 0):
    """The plugin tests' tiny CLIP-LLaVA (text head_dim 32, tower keys as vLLM reads them) with four decoder
    layers, so that several K withdraw."""
    case = build_tiny("llava", num_layers=LAYERS, seed=seed, text_config={"head_dim": 32})
    case.model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    _rename_tower_keys(folder / "model.safetensors")
    return case


def withdrawn(case, layer: int, request: Request) -> Reference:
    """vtexit's transformers path: ``vtexit.withdraw(model, layer=K)`` around greedy generate."""
    handle = vtexit.withdraw(case.model, layer=layer)
    try:
        return reference(case, None, request, None)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava_vtw")
    return path, save_tiny_llava(path)


BATCH = [
    Request(images(1, seed=1)),
    Request([]),
    Request(images(2, seed=3)),
    Request(images(1, seed=2), question="is it red ?"),
]


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_batch_matches_withdraw_on_transformers(folder, layer):
    path, case = folder
    llm = make_llm(path, {"method": "vtw", "layer": layer}, images_per_prompt=2, **NO_CACHE)
    outputs = llm.generate([r.vllm_input() for r in BATCH], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(BATCH, outputs, strict=True):
        worst = max(worst, compare(output, withdrawn(case, layer, request)))
    print(f"vtw K={layer}: largest logprob difference {worst:.2e}")
    # Controls: the stock model, and VTW at another K, are far from what vLLM computed on image requests.
    other = 1 if layer != 1 else 2
    for request, output in zip(BATCH, outputs, strict=True):
        if request.images:
            assert first_step_gap(output, reference(case, None, request, None)) > 100 * ATOL
            assert first_step_gap(output, withdrawn(case, other, request)) > 100 * ATOL
        else:  # no visual token: VTW is the stock model
            compare(output, reference(case, None, request, None))
    del llm


def splits_an_image(flags: list[bool]) -> bool:
    """A chunk that starts inside an image: its leading run of visual rows is shorter than an image (16) and ends
    inside the chunk."""
    run = next((i for i, flag in enumerate(flags) if not flag), len(flags))
    return 0 < run < 16 and run < len(flags)


def test_stress_chunked_prefill_and_joining_requests(folder):
    """A small token budget splits prompts (and images) over steps, and few sequences at once make requests wait
    and join while others decode; block ids are reused as requests finish."""
    path, case = folder
    layer = 2
    llm = make_llm(
        path,
        {"method": "vtw", "layer": layer},
        images_per_prompt=2,
        max_num_batched_tokens=32,
        max_num_seqs=3,
        **NO_CACHE,
    )
    record_steps(llm)
    requests = [
        Request(images(2, seed=10)),
        Request(images(1, seed=11)),
        Request([]),
        Request(images(1, seed=12), question="is it red ?"),
        Request(images(2, seed=13), question="what is left ?"),
        Request(images(1, seed=14)),
        Request([], question="hello there ?"),
    ]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, withdrawn(case, layer, request)))
    print(f"vtw stress: largest logprob difference {worst:.2e}")
    # The same requests again on the same engine (its blocks and visual-token counts reused), one at a time.
    for request in requests[:3]:
        output = llm.generate([request.vllm_input()], sampling(case), use_tqdm=False)[0]
        compare(output, withdrawn(case, layer, request))
    steps = recorded_steps(llm)
    rows = [row for step in steps for row in step]
    assert any(start > 0 and splits_an_image(flags) for start, _, flags in rows), "no chunk started inside an image"
    assert any(
        any(start > 0 and len(flags) == 1 for start, _, flags in step) and any(start == 0 for start, _, _ in step)
        for step in steps
    ), "no request joined while another decoded"
    fresh = [block for start, block, _ in rows if start == 0]
    assert len(fresh) > len(set(fresh)), "no KV block was reused by a new request"
    del llm


def test_preemption_recomputes_exactly(folder):
    """Too few KV blocks for the running requests: vLLM preempts some (frees their blocks) and recomputes them from
    an empty context later, while other requests reuse the blocks; each request's visual-token count restarts."""
    path, case = folder
    layer = 2
    llm = make_llm(
        path,
        {"method": "vtw", "layer": layer},
        images_per_prompt=2,
        max_model_len=96,
        max_num_batched_tokens=32,
        max_num_seqs=3,
        block_size=32,
        num_gpu_blocks_override=6,  # 62-token prompts and 6 new tokens: 3 blocks each, 3 requests at once
        **NO_CACHE,
    )
    record_steps(llm)
    question = "what shape is in the image ? " * 3 + "is it red ?"
    requests = [Request(images(2, seed=20 + i), question=question) for i in range(5)]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    for request, output in zip(requests, outputs, strict=True):
        compare(output, withdrawn(case, layer, request))
    computed = sum(len(flags) for step in recorded_steps(llm) for _, _, flags in step)
    once = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
    assert computed > once, "no request was preempted and recomputed"
    del llm


def test_steps_of_visual_rows_only(folder):
    """8 tokens a step, one request at a time: some steps hold image rows only, and layers >= K skip them."""
    path, case = folder
    layer = 3
    llm = make_llm(
        path,
        {"method": "vtw", "layer": layer},
        images_per_prompt=2,
        max_num_batched_tokens=8,
        max_num_seqs=1,
        **NO_CACHE,
    )
    record_steps(llm)
    requests = [Request(images(2, seed=30)), Request(images(1, seed=31))]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    for request, output in zip(requests, outputs, strict=True):
        compare(output, withdrawn(case, layer, request))
    assert any(all(all(flags) for _, _, flags in step) for step in recorded_steps(llm)), "no step of image rows only"
    del llm


def test_hybrid_pool_then_vtw(folder):
    path, case = folder
    method = {"method": "hybrid", "pre": {"method": "pool", "stride": 2}, "then": {"method": "vtw", "layer": 2}}
    llm = make_llm(path, method, images_per_prompt=2, **NO_CACHE)
    outputs = llm.generate([r.vllm_input() for r in BATCH], sampling(case), use_tqdm=False)
    for request, output in zip(BATCH, outputs, strict=True):
        expected = reference(case, method, request, kept=4)
        compare(output, expected)
        if request.images:  # control: pool alone
            assert first_step_gap(output, reference(case, method["pre"], request, 4)) > 100 * ATOL
    del llm


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({}, "prefix caching"),
        ({**NO_CACHE, "enforce_eager": False}, "enforce_eager=True"),
    ],
)
def test_unsafe_engines_are_refused(folder, settings, match):
    path, _ = folder
    with pytest.raises(Exception, match=match):
        make_llm(path, {"method": "vtw", "layer": 2}, images_per_prompt=1, **settings)


def test_layer_out_of_range_is_refused(folder):
    path, _ = folder
    with pytest.raises(Exception, match=r"layer must be in \[1, 4\]"):
        make_llm(path, {"method": "vtw", "layer": 0}, images_per_prompt=1, **NO_CACHE)


def test_settings():
    assert split_setting({"method": "vtw", "layer": "3"}) == ({"method": "none"}, 3)
    pre, layer = split_setting(
        {"method": "hybrid", "pre": {"method": "pool", "stride": 2}, "then": {"method": "vtw", "layer": 5}}
    )
    assert (pre["method"], pre["stride"], layer) == ("pool", 2, 5)
    assert split_setting({"method": "pool", "stride": 2}) == ({"method": "pool", "stride": 2}, None)
    with pytest.raises(ValueError, match="in-LLM step as vtw only"):
        split_setting(
            {
                "method": "hybrid",
                "pre": {"method": "pool", "stride": 2},
                "then": {"method": "fastv", "layer": 1, "keep": 0.5},
            }
        )
    with pytest.raises(ValueError, match="layer"):
        split_setting({"method": "vtw", "layer": -1})
