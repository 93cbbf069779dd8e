"""LLaVA with a SigLIP tower (no CLS token, ``vision_feature_select_strategy="full"``): pool and DivPrune inside vLLM
equal vtexit's transformers path on the same weights (the prompt vLLM runs, greedy tokens, every step's top-20
logprobs), as for CLIP: both work on the projector's output. VisionZip too, by the transformers path's rule for towers
without a CLS token: each patch ranked by the attention it receives in the layer the projector reads (mean over
heads and queries), the kept tokens in their order and each contextual target the mean of its group's projected
tokens."""

from __future__ import annotations

import pytest
from _tiny_vllm import (
    ARCH,
    ATOL,
    Request,
    compare,
    first_step_gap,
    images,
    make_llm,
    reference,
    sampling,
    save_tiny_siglip_llava,
)

from vtexit.integrations.vllm.reduction import ImageReduction

POOL = {"method": "pool", "stride": 3}  # 4 x 4 grid -> 4 tokens, odd edges
DIVPRUNE = {"method": "divprune", "keep": 0.25}  # 4 of 16
VISIONZIP = {"method": "visionzip", "keep": 0.5, "contextual_share": 0.25}  # 16 -> 6 dominant + 2 merged


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_siglip_llava")
    case = save_tiny_siglip_llava(folder)
    assert case.model.config.vision_config.model_type == "siglip_vision_model"
    return case, folder


def run_and_compare(case, folder, method, requests, images_per_prompt, control: dict | None = None):
    """vLLM with ``method`` against vtexit's transformers path, request by request; controls: the unpatched model
    and, if given, the ``control`` method (as many tokens by another rule) are far from it."""
    llm = make_llm(folder, method, images_per_prompt=images_per_prompt)
    try:
        outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    finally:
        del llm
    kept = ImageReduction.from_setting(method).count(16)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, reference(case, method, request, kept)))
        if request.images:  # control: the unpatched model (16 tokens per image) is far from it
            assert first_step_gap(output, reference(case, None, request, None)) > 100 * ATOL
            if control is not None:
                assert first_step_gap(output, reference(case, control, request, kept)) > 100 * ATOL
    return worst


def test_pool_matches_transformers(siglip):
    case, folder = siglip
    requests = [Request(images(1, seed=1)), Request([]), Request(images(2, seed=3))]
    worst = run_and_compare(case, folder, POOL, requests, images_per_prompt=2)
    print(f"siglip pool: largest logprob difference {worst:.2e}")


def test_divprune_matches_transformers(siglip):
    case, folder = siglip
    requests = [Request(images(1, seed=1)), Request([]), Request(images(1, seed=2))]
    worst = run_and_compare(case, folder, DIVPRUNE, requests, images_per_prompt=1)
    print(f"siglip divprune: largest logprob difference {worst:.2e}")


def test_visionzip_matches_transformers(siglip):
    case, folder = siglip
    requests = [Request(images(1, seed=1)), Request([]), Request(images(1, seed=2)), Request(images(2, seed=3))]
    other = {"method": "divprune", "keep": 0.5}  # as many tokens, chosen by DivPrune's rule
    worst = run_and_compare(case, folder, VISIONZIP, requests, images_per_prompt=2, control=other)
    print(f"siglip visionzip: largest logprob difference {worst:.2e}")


def test_siglip_with_the_default_strategy_is_refused(siglip):
    """'default' drops the first token, a patch on SigLIP: the plugin asks for 'full'."""
    _, folder = siglip
    overrides = {"architectures": [ARCH], "vtexit": DIVPRUNE, "vision_feature_select_strategy": "default"}
    with pytest.raises(Exception, match="vision_feature_select_strategy='full' with a SigLIP tower"):
        make_llm(folder, DIVPRUNE, images_per_prompt=1, hf_overrides=overrides)
