"""vtexit's divprune inside vLLM equals vtexit's divprune on transformers (same weights, float32): the prompt vLLM
runs, greedy tokens and every step's top-20 logprobs, for a batch of requests with different images and one without
an image. DivPrune chooses among a prompt's visual tokens, so the plugin runs it with one image per prompt."""

from __future__ import annotations

import pytest
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

METHOD = {"method": "divprune", "keep": 0.25}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava_divprune")
    case = save_tiny_llava(folder)
    llm = make_llm(folder, METHOD, images_per_prompt=1)
    yield case, llm, folder
    del llm


def test_divprune_count_is_content_free():
    assert ImageReduction.from_setting(METHOD).count(16) == 4
    assert ImageReduction.from_setting({"method": "divprune", "keep": 0.1}).count(576) == 58  # round half up
    assert ImageReduction.from_setting({"method": "divprune", "keep": 0.001}).count(16) == 1  # at least one


def test_batch_of_requests_matches_transformers(setup):
    case, llm, _ = setup
    kept = ImageReduction.from_setting(METHOD).count(16)
    requests = [Request(images(1, seed=1)), Request([]), Request(images(1, seed=2)), Request(images(1, seed=4))]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, reference(case, METHOD, request, kept)))
    print(f"divprune: largest logprob difference {worst:.2e}")
    assert worst <= ATOL
    for request, output in zip(requests, outputs, strict=True):
        if request.images:  # controls: pooling the same number of tokens is not what ran
            assert first_step_gap(output, reference(case, {"method": "pool", "stride": 2}, request, kept)) > 100 * ATOL


def test_several_images_per_prompt_are_refused(setup):
    _, _, folder = setup
    with pytest.raises(Exception, match="chooses among all the visual tokens of a prompt"):
        make_llm(folder, METHOD, images_per_prompt=2)


def test_chunked_prefill_and_prefix_cache_hits(setup):
    """Prompts split across scheduler steps (8 tokens a step: an image's slots straddle two steps), requests joining
    mid-decode, and repeated prompts answered from vLLM's prefix cache (blocks of 32 tokens: the prompts are longer
    than one) give the same tokens and logprobs."""
    case, _, folder = setup
    kept = ImageReduction.from_setting(METHOD).count(16)
    llm = make_llm(folder, METHOD, images_per_prompt=1, max_num_batched_tokens=8, max_num_seqs=3, block_size=32)
    question = "is there a red circle or a blue triangle or a green rectangle or a yellow shape in the image ? " * 2
    first, second = Request(images(1, seed=5), question), Request(images(1, seed=6), question)
    requests = [first, second, Request([], question), first, second, first]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    expected = {id(r): reference(case, METHOD, r, kept) for r in (first, second, requests[2])}
    for request, output in zip(requests, outputs, strict=True):
        compare(output, expected[id(request)])
    repeated = llm.generate([first.vllm_input()], sampling(case), use_tqdm=False)[0]
    assert (repeated.num_cached_tokens or 0) > 0  # answered from the prefix cache
    compare(repeated, expected[id(first)])
