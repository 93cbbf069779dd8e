"""vtexit's pool and divprune inside vLLM on Qwen2.5-VL equal vtexit's transformers path (same weights, float32): the
prompt vLLM runs, greedy tokens and every step's top-20 logprobs, for batches of requests with different images
(non-square grids of merged tokens, wide and tall), a request without an image and, for pool, two images in one
request; pool on Qwen2-VL too. The kept tokens sit at their original (t, h, w) positions and the text at the full
prompt's: a control renumbers them as a shorter prompt would and lands far away. DivPrune also runs with chunked
prefill (8 tokens a step) and the prefix cache."""

from __future__ import annotations

import pytest
import torch
from _tiny_qwen import (
    Request,
    image,
    make_qwen_llm,
    make_qwen_processor,
    merged_tokens,
    reference,
    save_tiny_qwen,
)
from _tiny_vllm import ATOL, TOKENS, compare, first_step_gap, sampling

from vtexit.integrations.vllm.reduction import ImageReduction

POOL = {"method": "pool", "stride": 2}
DIVPRUNE = {"method": "divprune", "keep": 0.25}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    return path, save_tiny_qwen(path)


@pytest.fixture(scope="module")
def pool_llm(folder):
    path, _ = folder
    llm = make_qwen_llm(path, POOL, images_per_prompt=2, enable_mm_embeds=True)
    yield llm
    del llm


@pytest.fixture(scope="module")
def divprune_llm(folder):
    """DivPrune with 8 tokens a scheduler step (an image's slots straddle steps; requests join mid-decode) and a
    prefix cache of 32-token blocks."""
    path, _ = folder
    llm = make_qwen_llm(path, DIVPRUNE, images_per_prompt=1, max_num_batched_tokens=8, max_num_seqs=3, block_size=32)
    yield llm
    del llm


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    case = save_tiny_qwen(path, family="qwen2_vl")
    llm = make_qwen_llm(path, POOL, images_per_prompt=2, family="qwen2_vl")
    yield case, llm
    del llm


def kept_counts(method: dict, request: Request) -> list[int]:
    reduction = ImageReduction.from_setting(method)
    return [reduction.grid_count(*merged_tokens(picture)) for picture in request.images]


def check_batch(case, llm, method: dict, requests: list[Request]) -> list:
    outputs = llm.generate([r.vllm_input() for r in requests], sampling(case), use_tqdm=False)
    worst = 0.0
    for request, output in zip(requests, outputs, strict=True):
        worst = max(worst, compare(output, reference(case, method, request, kept_counts(method, request), TOKENS)))
    print(f"{method['method']}: largest logprob difference {worst:.2e}")
    assert worst <= ATOL
    return outputs


def renumbered_logprobs(case, method: dict, request: Request) -> torch.Tensor:
    """Control: the first step's logprobs with the same kept tokens at consecutive positions (0, 1, 2, ... on all
    three M-RoPE axes), as a shorter prompt would number them (the plugin's LLaVA convention)."""
    model, config = case.model, case.model.config
    processor = make_qwen_processor(config)
    inputs = processor(text=request.prompt, images=request.images, return_tensors="pt")
    reduction = ImageReduction.from_setting(method)
    merge = config.vision_config.spatial_merge_size
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        kept = [
            reduction.reduce_grid(f, int(h) // merge, int(w) // merge)[0]
            for f, (_, h, w) in zip(features, inputs["image_grid_thw"], strict=True)
        ]
        ids = torch.tensor(reference(case, method, request, kept_counts(method, request), 1).prompt_ids)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == config.image_token_id] = torch.cat(kept)
        positions = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
        logits = model(inputs_embeds=embeds[None], position_ids=positions).logits[0, -1]
    return logits.float().log_softmax(-1)


def test_entry_point_registers_the_qwen_classes():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from vtexit.integrations.vllm import QWEN_ARCHITECTURES

    {e.name: e for e in entry_points(group="vllm.general_plugins")}["vtexit"].load()()
    assert set(QWEN_ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())


def test_counts_are_content_free():
    pool, divprune = ImageReduction.from_setting(POOL), ImageReduction.from_setting(DIVPRUNE)
    assert merged_tokens(image(0)) == (4, 6)  # 32 x 48 px: 8 x 12 patches, 2 x 2 merged
    assert pool.grid_count(4, 6) == 6 and pool.grid_count(5, 3) == 6 and pool.grid_count(1, 1) == 1
    assert divprune.grid_count(4, 6) == 6 and divprune.grid_count(5, 5) == 6  # 25 / 4 rounded half up


def test_pool_batch_matches_transformers(folder, pool_llm):
    _, case = folder
    requests = [
        Request([image(1)]),  # 4 x 6 merged tokens
        Request([]),
        Request([image(3, 48, 32)]),  # 6 x 4
        Request([image(2, 40, 24), image(4)]),  # 5 x 3 (odd edges: smaller blocks), then 4 x 6
    ]
    outputs = check_batch(case, pool_llm, POOL, requests)
    for request, output in zip(requests, outputs, strict=True):
        if request.images:  # controls: the unpatched model, and the pooled tokens renumbered as a shorter prompt
            assert first_step_gap(output, reference(case, None, request, None, TOKENS)) > 100 * ATOL
            top = output.outputs[0].logprobs[0]
            renumbered = renumbered_logprobs(case, POOL, request)
            assert max(abs(lp.logprob - float(renumbered[t])) for t, lp in top.items()) > 100 * ATOL


def test_qwen2_vl_pool_batch_matches_transformers(qwen2_vl):
    case, llm = qwen2_vl
    requests = [Request([image(1)]), Request([]), Request([image(2, 40, 24), image(3, 48, 32)])]
    outputs = check_batch(case, llm, POOL, requests)
    for request, output in zip(requests, outputs, strict=True):
        if request.images:
            top = output.outputs[0].logprobs[0]
            renumbered = renumbered_logprobs(case, POOL, request)
            assert max(abs(lp.logprob - float(renumbered[t])) for t, lp in top.items()) > 100 * ATOL


def test_divprune_batch_matches_transformers(folder, divprune_llm):
    _, case = folder
    requests = [Request([image(1)]), Request([]), Request([image(3, 48, 32)]), Request([image(5, 40, 40)])]
    outputs = check_batch(case, divprune_llm, DIVPRUNE, requests)
    for request, output in zip(requests, outputs, strict=True):
        if request.images:  # control: pooling to the same count is not what ran
            pooled = {"method": "pool", "stride": 2}
            assert first_step_gap(output, reference(case, pooled, request, kept_counts(pooled, request), 1)) > 0.01


def test_divprune_prefix_cache_hits(folder, divprune_llm):
    """A repeated prompt longer than a cache block is answered from vLLM's prefix cache with the same tokens and
    logprobs (its text after the image keeps the full prompt's positions)."""
    _, case = folder
    question = "is there a red circle or a blue triangle or a green rectangle or a yellow shape in the image ? " * 2
    request = Request([image(6)], question)
    expected = reference(case, DIVPRUNE, request, kept_counts(DIVPRUNE, request), TOKENS)
    first = divprune_llm.generate([request.vllm_input()], sampling(case), use_tqdm=False)[0]
    compare(first, expected)
    repeated = divprune_llm.generate([request.vllm_input()], sampling(case), use_tqdm=False)[0]
    assert (repeated.num_cached_tokens or 0) > 0
    compare(repeated, expected)


def test_video_is_refused(pool_llm):
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8).numpy()
    metadata = {"total_num_frames": 2, "fps": 2.0, "duration": 1.0, "frames_indices": [0, 1], "do_sample_frames": False}
    request = {
        "prompt": "user : <|vision_start|><|video_pad|><|vision_end|> what is it ? </s> assistant :",
        "multi_modal_data": {"video": (frames, metadata)},
    }
    with pytest.raises(ValueError, match="video inputs are not supported"):
        pool_llm.generate([request], use_tqdm=False)


def test_image_embeddings_are_refused(folder, pool_llm):
    _, case = folder
    rows, cols = merged_tokens(image(0))
    embeds = {
        "image_embeds": torch.randn(rows * cols, case.model.config.text_config.hidden_size),
        "image_grid_thw": torch.tensor([[1, rows * 2, cols * 2]]),
    }
    request = {"prompt": Request([image(0)]).prompt, "multi_modal_data": {"image": embeds}}
    with pytest.raises(ValueError, match="precomputed image embeddings"):
        pool_llm.generate([request], use_tqdm=False)


@pytest.mark.parametrize(
    ("method", "images", "message"),
    [(DIVPRUNE, 2, "chooses among all the visual tokens of a prompt")],
)
def test_unsupported_settings_are_refused_at_load(folder, method, images, message):
    path, _ = folder
    with pytest.raises(Exception, match=message):
        make_qwen_llm(path, method, images_per_prompt=images)
