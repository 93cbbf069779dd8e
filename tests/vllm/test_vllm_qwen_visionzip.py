"""vtexit's visionzip inside vLLM on Qwen2.5-VL and Qwen2-VL equals vtexit's transformers path (same weights,
float32): the prompt vLLM runs, greedy tokens and every step's top-20 logprobs, for a batch of requests with
different images (wide, tall and odd grids of merged tokens), a request without an image and one with two images.

The rule is the transformers path's (``QwenGroups``, ``zip_plan``, ``apply_plan``), fed from vLLM's own vision
modules: each merged token scored by the attention its 4 patches receive in the last full-attention block (recomputed
from that block's input through vLLM's fused qkv projection and rotary tables), the dominant tokens and the
contextual targets kept in place, each target holding its group's mean, at their original (t, h, w) positions.
Controls: the unpatched model, and DivPrune keeping as many tokens, land far away."""

from __future__ import annotations

import pytest
from _tiny_qwen import Request, image, make_qwen_llm, merged_tokens, reference, save_tiny_qwen
from _tiny_vllm import ATOL, TOKENS, compare, first_step_gap, sampling

from vtexit.integrations.vllm.reduction import ImageReduction

VISIONZIP = {"method": "visionzip", "keep": 0.5, "contextual_share": 0.25}
DIVPRUNE = {"method": "divprune", "keep": 0.5}  # control: as many tokens per image, DivPrune's choice


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny_{request.param}_visionzip")
    case = save_tiny_qwen(path, family=request.param)
    llm = make_qwen_llm(path, VISIONZIP, images_per_prompt=2, family=request.param)
    yield case, llm
    del llm


def kept_counts(method: dict, request: Request) -> list[int]:
    reduction = ImageReduction.from_setting(method)
    return [reduction.grid_count(*merged_tokens(picture)) for picture in request.images]


def test_visionzip_counts_are_content_free():
    reduction = ImageReduction.from_setting(VISIONZIP)
    assert reduction.grid_count(4, 6) == 12 and reduction.grid_count(5, 3) == 8  # 15 / 2 rounded half up
    assert reduction.grid_count(4, 6) == ImageReduction.from_setting(DIVPRUNE).grid_count(4, 6)


def test_visionzip_batch_matches_transformers(engine):
    case, llm = engine
    requests = [
        Request([image(1)]),  # 4 x 6 merged tokens
        Request([]),
        Request([image(3, 48, 32)]),  # 6 x 4
        Request([image(2, 40, 24), image(4)]),  # 5 x 3, then 4 x 6
    ]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        expected = reference(case, VISIONZIP, request, kept_counts(VISIONZIP, request), TOKENS)
        worst = max(worst, compare(output, expected))
        if request.images:
            assert first_step_gap(output, reference(case, None, request, None, 1)) > 100 * ATOL
        if len(request.images) == 1:  # DivPrune chooses across a row's images: compared on one image only
            other = reference(case, DIVPRUNE, request, kept_counts(DIVPRUNE, request), 1)
            assert first_step_gap(output, other) > 100 * ATOL
    print(f"{case.model.config.model_type} visionzip: largest logprob difference {worst:.2e}")
    assert worst <= ATOL
