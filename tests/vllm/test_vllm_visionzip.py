"""vtexit's visionzip inside vLLM equals vtexit's visionzip on transformers (same weights, float32): the prompt vLLM
runs, greedy tokens and every step's top-20 logprobs, for a batch of requests with different images, one without an
image and one with two images. On a CLIP tower (vLLM's module) and on a DINOv2 tower (transformers' module, which the
plugin builds), both with two layers and the projector reading the second-to-last, as LLaVA-1.5 does (vLLM then
builds only the first CLIP layer); the CLS token's attention in that layer ranks the patches."""

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
    save_tiny_dinov2_llava,
    save_tiny_llava,
)

from vtexit.integrations.vllm.reduction import ImageReduction

METHOD = {"method": "visionzip", "keep": 0.5, "contextual_share": 0.25}  # 16 -> 6 dominant (CLS first) + 2 merged


@pytest.fixture(scope="module", params=["clip", "dinov2"])
def setup(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}_llava_visionzip")
    if request.param == "clip":
        case = save_tiny_llava(folder, vision_config={"num_hidden_layers": 2}, vision_feature_layer=-2)
    else:
        case = save_tiny_dinov2_llava(folder)
        assert case.model.config.vision_config.model_type == "dinov2"
    llm = make_llm(folder, METHOD, images_per_prompt=2)
    yield case, llm
    del llm


def test_visionzip_count_is_content_free():
    assert ImageReduction.from_setting(METHOD).count(16) == 8
    assert ImageReduction.from_setting({"method": "visionzip", "keep": 64 / 576}).count(576) == 64  # 54 + 10


def test_batch_of_requests_matches_transformers(setup):
    case, llm = setup
    kept = ImageReduction.from_setting(METHOD).count(16)
    requests = [Request(images(1, seed=1)), Request([]), Request(images(1, seed=2)), Request(images(2, seed=3))]
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, reference(case, METHOD, request, kept)))
    print(f"visionzip on {case.model.config.vision_config.model_type}: largest logprob difference {worst:.2e}")
    assert worst <= ATOL
    other = {"method": "divprune", "keep": 0.5}  # control: as many tokens by DivPrune's rule is not what ran
    for request, output in zip(requests, outputs, strict=True):
        if request.images:
            assert first_step_gap(output, reference(case, other, request, kept)) > 100 * ATOL
