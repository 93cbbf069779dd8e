"""vtexit's pool inside vLLM equals vtexit's pool on transformers (same weights, float32): the prompt vLLM runs,
greedy tokens and every step's top-20 logprobs, for a batch of requests with different images, a request without an
image and a request with two images."""

from __future__ import annotations

import pytest
import torch
from _tiny_vllm import (
    ATOL,
    Request,
    compare,
    first_step_gap,
    images,
    make_llm,
    reference,
    sampling,
    save_tiny_llava,
)

from vtexit.integrations.vllm.reduction import ImageReduction

METHOD = {"method": "pool", "stride": 3}  # 4 x 4 grid: blocks of 3 x 3, 3 x 1, 1 x 3 and 1 x 1 (odd edges)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava_pool")
    case = save_tiny_llava(folder)
    llm = make_llm(folder, METHOD, images_per_prompt=2, enable_mm_embeds=True)
    yield case, llm
    del llm


def test_pool_count_is_content_free():
    reduction = ImageReduction.from_setting(METHOD)
    assert reduction.count(16) == 4
    assert ImageReduction.from_setting({"method": "pool", "stride": "2"}).count(576) == 144
    assert ImageReduction.from_setting({"method": "pool", "stride": 5}).count(576) == 25


def test_batch_of_requests_matches_transformers(setup):
    case, llm = setup
    kept = ImageReduction.from_setting(METHOD).count(16)
    requests = [
        Request(images(1, seed=1)),
        Request([]),
        Request(images(1, seed=2)),
        Request(images(2, seed=3)),
    ]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, reference(case, METHOD, request, kept)))
    print(f"pool: largest logprob difference {worst:.2e}")
    assert worst <= ATOL
    # Controls: the unpatched model (16 tokens per image) is far from what vLLM computed for image requests.
    for request, output in zip(requests, outputs, strict=True):
        if request.images:
            assert first_step_gap(output, reference(case, None, request, None)) > 100 * ATOL


def test_image_embeddings_are_refused(setup):
    case, llm = setup
    embeds = torch.randn(1, 16, case.model.config.text_config.hidden_size)  # one image's projected tokens
    request = {"prompt": Request([]).prompt.replace("user :", "user : <image>"), "multi_modal_data": {"image": embeds}}
    with pytest.raises(ValueError, match="precomputed image embeddings"):
        llm.generate([request], sampling(case), use_tqdm=False)
