"""VTW inside vLLM's decoder on Qwen2.5-VL and Qwen2-VL equals ``vtexit.withdraw(model, layer=K)`` on transformers
(same weights, float32): greedy tokens and every step's top-20 logprobs, for several K, a batch with images of
different grids, no image and two images, a hybrid (pool before the LLM, then VTW), and a stress run (a few tokens a
step, so chunks split images, and few sequences at once, so requests join mid-decode). Layers >= K run the text rows
alone at their original M-RoPE (t, h, w) positions. Controls: the stock model and a wrong K are far off."""

from __future__ import annotations

import pytest
from _tiny_qwen import Request, image, make_qwen_llm, merged_tokens, reference, save_tiny_qwen
from _tiny_vllm import ATOL, TOKENS, compare, first_step_gap, record_steps, recorded_steps, sampling

import vtexit
from vtexit.integrations.vllm.reduction import ImageReduction

LAYERS = 4  # decoder layers of the tiny models: K in 1..3 withdraws, K = 4 is the stock model
NO_CACHE = {"enable_prefix_caching": False}
POOL = {"method": "pool", "stride": 2}

BATCH = [
    Request([image(1)]),
    Request([]),
    Request([image(2, 24, 40), image(3, 48, 32)]),
    Request([image(4, 40, 24)], question="is it red ?"),
]


@pytest.fixture(scope="module")
def qwen2_5(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl_vtw")
    return path, save_tiny_qwen(path, num_layers=LAYERS)


def withdrawn(case, layer: int, request: Request, pre: dict | None = None) -> object:
    """vtexit's transformers path: ``vtexit.withdraw(model, layer=K)`` around greedy generate (``pre``: the hybrid of
    that pre-LLM method then VTW at K, through ``vtexit.apply``)."""
    if pre is not None:
        reduction = ImageReduction.from_setting(pre)
        kept = [reduction.grid_count(*merged_tokens(picture)) for picture in request.images]
        hybrid = {"method": "hybrid", "pre": pre, "then": {"method": "vtw", "layer": layer}}
        return reference(case, hybrid, request, kept, TOKENS)
    handle = vtexit.withdraw(case.model, layer=layer)
    try:
        return reference(case, None, request, None, TOKENS)
    finally:
        handle.remove()


def check(case, llm, layer: int, requests: list[Request], pre: dict | None = None) -> list:
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        ref = withdrawn(case, layer, request, pre)
        assert list(output.prompt_token_ids) == ref.prompt_ids
        worst = max(worst, compare(output, ref))
    print(f"vtw K={layer} (pre {pre}): largest logprob difference {worst:.2e}")
    assert worst <= ATOL
    return outputs


def check_controls(case, outputs, layer: int, requests: list[Request]) -> None:
    """The stock model, and VTW at another K, are far from what vLLM computed on image requests; without an image
    VTW is the stock model."""
    other = 1 if layer != 1 else 2
    for request, output in zip(requests, outputs, strict=True):
        stock = reference(case, None, request, None, TOKENS)
        if request.images:
            assert first_step_gap(output, stock) > 100 * ATOL
            assert first_step_gap(output, withdrawn(case, other, request)) > 100 * ATOL
        else:
            assert compare(output, stock) <= ATOL


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_qwen2_5_vl_batch_matches_withdraw_on_transformers(qwen2_5, layer):
    path, case = qwen2_5
    llm = make_qwen_llm(path, {"method": "vtw", "layer": layer}, images_per_prompt=2, **NO_CACHE)
    outputs = check(case, llm, layer, BATCH)
    check_controls(case, outputs, layer, BATCH)
    del llm


def test_qwen2_5_vl_hybrid_pool_then_vtw(qwen2_5):
    path, case = qwen2_5
    method = {"method": "hybrid", "pre": POOL, "then": {"method": "vtw", "layer": 2}}
    llm = make_qwen_llm(path, method, images_per_prompt=2, **NO_CACHE)
    check(case, llm, 2, BATCH, pre=POOL)
    del llm


def test_qwen2_5_vl_stress_chunks_split_images_and_requests_join(qwen2_5):
    """8 tokens a step: chunks start and end inside images (their visual tokens straddle steps); 2 sequences at
    once: requests wait, then join while others decode, on reused KV blocks."""
    path, case = qwen2_5
    requests = [
        Request([image(10, 32, 32), image(11, 16, 24)]),
        Request([image(12, 40, 40)]),
        Request([]),
        Request([image(13, 24, 48)], question="what is left ?"),
        Request([image(14)], question="hello there ?"),
    ]
    llm = make_qwen_llm(
        path, {"method": "vtw", "layer": 2}, images_per_prompt=2, max_num_batched_tokens=8, max_num_seqs=2, **NO_CACHE
    )
    record_steps(llm)
    check(case, llm, 2, requests)
    steps = recorded_steps(llm)
    del llm
    last_flag: dict[int, bool] = {}  # per first KV block: was the request's last row so far visual
    split, joined, reused, used = 0, 0, 0, set()
    for rows in steps:
        decoding = any(context > 0 and len(flags) == 1 for context, _, flags in rows)
        for context, block, flags in rows:
            if context == 0:
                reused += block in used
                used.add(block)
                joined += decoding
            elif flags and flags[0] and last_flag.get(block):
                split += 1  # this chunk goes on with an image the previous chunk began
            if flags:
                last_flag[block] = flags[-1]
    assert split > 0 and joined > 0 and reused > 0, (split, joined, reused)


def test_qwen2_vl_batch_matches_withdraw_on_transformers(tmp_path):
    case = save_tiny_qwen(tmp_path, family="qwen2_vl", num_layers=LAYERS)
    llm = make_qwen_llm(tmp_path, {"method": "vtw", "layer": 2}, images_per_prompt=2, family="qwen2_vl", **NO_CACHE)
    outputs = check(case, llm, 2, BATCH)
    check_controls(case, outputs, 2, BATCH)
    del llm


@pytest.mark.parametrize(
    ("method", "settings", "match"),
    [
        ({"method": "vtw", "layer": 2}, {}, "prefix caching"),
        ({"method": "vtw", "layer": 0}, NO_CACHE, r"layer must be in \[1, 4\]"),
    ],
)
def test_unsafe_settings_are_refused(qwen2_5, method, settings, match):
    path, _ = qwen2_5
    with pytest.raises(Exception, match=match):
        make_qwen_llm(path, method, images_per_prompt=1, **settings)
