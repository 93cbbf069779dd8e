"""Visual-grid pooling before the language model against the unpatched model on the pooled prompt built by hand
(each frame's 2 x 2 blocks averaged with plain loops, fed as ``inputs_embeds``), forward and cached generate. The
frames: LLaVA's square images walked by hand; the other families' cut from the model's own vision features
(tests/grid_reference.py) or, on Qwen-VL, walked from image_grid_thw (tests/yopo_reference.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from grid_reference import blocks_by_hand, hand_places
from reduced_prompt import check_against_reduced_prompt, greedy_case, layer0_inputs, left_pad, rebuild_rows
from reference import record_layer_inputs, scheduled_logits
from yopo_reference import hand_grid

import vtexit
from vtexit.core.families import family_for
from vtexit.testing.tiny_models import build_tiny


def _pooled_prompt(case, inputs: dict, stride: int, flags: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens, every image's stride x stride blocks replaced by their mean at the block's top-left
    token, left-padded with zero vectors; and the attention mask. By hand: the k-th run of image_seq_length image
    tokens in a row is image k, a square grid in row-major order. ``flags``, if given, receives per row whether each
    kept token is visual."""
    embeds = layer0_inputs(case.model, inputs)
    side = math.isqrt(case.model.config.image_seq_length)

    def pooled(b: int, i: int, seen: int) -> list[torch.Tensor]:
        local = seen % (side * side)
        start = i - local  # the image's first token
        r, c = divmod(local, side)
        if r % stride or c % stride:
            return []
        block = [
            embeds[b, start + rr * side + cc]
            for rr in range(r, min(r + stride, side))
            for cc in range(c, min(c + stride, side))
        ]
        return [torch.stack(block).float().mean(0).to(embeds.dtype)]

    rows, is_visual = rebuild_rows(embeds, inputs, case.media_mask(inputs), pooled)
    if flags is not None:
        flags.extend(is_visual)
    return left_pad(rows)


@pytest.fixture(scope="module")
def llava():
    return greedy_case("llava")


@torch.no_grad()
@pytest.mark.parametrize("stride, cache", [(2, "dynamic"), (3, "dynamic"), (2, "static")])
def test_pool_equals_the_unpatched_model_on_the_pooled_prompt(llava, stride, cache):
    inputs = llava.inputs([1, 2, 0], text_len=[5, 3, 7])
    embeds, mask = _pooled_prompt(llava, inputs, stride)
    patch = lambda m: vtexit.pool(m, stride=stride)  # noqa: E731
    check_against_reduced_prompt(llava.model, inputs, embeds, mask, patch, steps=3, cache_implementation=cache)


@torch.no_grad()
def test_pool_then_vtw_equals_layers_run_by_hand(llava):
    """A hybrid with pooling: the pooled prompt's layer inputs (unpatched model), then layers K.. run by hand on its
    text tokens; one remove() restores the model."""
    model, layer = llava.model, 2
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    before = model(**inputs).logits
    flags: list = []
    embeds, mask = _pooled_prompt(llava, inputs, 2, flags)
    seen = record_layer_inputs(model, {"inputs_embeds": embeds, "attention_mask": mask})
    config = vtexit.HybridConfig(pre={"method": "pool", "stride": 2}, then={"method": "vtw", "layer": layer})
    with vtexit.apply(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    for b, row in enumerate(flags):
        pad = int((mask[b] == 0).sum())
        slots = torch.tensor([pad + j for j, visual in enumerate(row) if not visual])
        expected = scheduled_logits(model, seen, b, [(layer, slots)])
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(model(**inputs).logits, before)


def _pooled_by_hand(model, inputs: dict, stride: int, flags: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens, every block of visual tokens (same frame, same stride x stride cell of its grid, as
    tests/grid_reference.py finds them from the model's own features) replaced by its mean at its top-left token.
    ``flags``, if given, receives per row whether each kept token is visual."""
    embeds = layer0_inputs(model, inputs)
    places = hand_places(model, inputs)
    rows = []
    for b in range(embeds.shape[0]):
        blocks = blocks_by_hand(places[b], stride)
        real = inputs["attention_mask"][b].bool().tolist()
        kept, visual = [], []
        for i, place in enumerate(places[b]):
            if not real[i]:
                continue
            if place is None:
                kept.append(embeds[b, i])
                visual.append(False)
            elif i in blocks:
                kept.append(embeds[b, blocks[i]].float().mean(0).to(embeds.dtype))
                visual.append(True)
        rows.append(torch.stack(kept))
        if flags is not None:
            flags.append(visual)
    return left_pad(rows)


POOL_FAMILIES = {
    "llava_next": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
    "llava_onevision": dict(images_per_row=[1, 2, 0], videos_per_row=[0, 0, 1], text_len=[5, 3, 7]),
    "internvl": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
    "idefics3": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(POOL_FAMILIES))
def test_pool_on_tiles_anyres_and_video_equals_the_pooled_prompt(name):
    """Blocks stay inside a tile / crop / video frame / anyres part; an anyres grid's newline column pools with
    itself (one newline per pooled row)."""
    case = greedy_case(name)
    inputs = case.inputs(**POOL_FAMILIES[name])
    embeds, mask = _pooled_by_hand(case.model, inputs, 2)
    patch = lambda m: vtexit.pool(m, stride=2)  # noqa: E731
    check_against_reduced_prompt(case.model, inputs, embeds, mask, patch, steps=3)


@torch.no_grad()
def test_pool_on_gemma3_equals_the_pooled_prompt():
    """Gemma3's images (square grids of mm_tokens_per_image tokens) pooled; the reference gets the pooled prompt's
    token types, so each image's pooled tokens still attend to each other both ways."""
    case = greedy_case("gemma3")
    model = case.model
    inputs = case.inputs([1, 2, 0], text_len=[5, 3, 7])
    flags: list = []
    embeds, mask = _pooled_by_hand(model, inputs, 2, flags)
    types = torch.zeros_like(mask)
    for b, visual in enumerate(flags):
        types[b, mask.shape[1] - len(visual) :] = torch.tensor(visual, dtype=torch.long)
    reference = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, use_cache=False).logits
    with vtexit.pool(model, stride=2) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    assert layout.valid.sum(1).tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(logits[layout.valid], reference[mask.bool()], atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_pool_on_qwen_grids_equals_the_pooled_prompt_at_its_mrope_positions(name):
    """Qwen-VL frames from image_grid_thw (walked by hand in tests/yopo_reference.py); a pooled token keeps its
    block leader's (t, h, w) position. Forward logits, and generate's first step (its grid from the M-RoPE
    position ids generate passes), against the unpatched model on the pooled prompt at those positions."""
    case = greedy_case(name)
    model = case.model
    inputs = case.inputs([1, 2, 0], text_len=[5, 3, 7])
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    embeds, positions = seen["inputs_embeds"], seen["position_ids"][-3:]  # (t, h, w) rows
    media, frame, row, col = hand_grid(model, inputs["input_ids"], inputs)
    rows, kept_positions = [], []
    for b in range(media.shape[0]):
        places = [
            None if not media[b, i] else (int(frame[b, i]), int(row[b, i]), int(col[b, i]), 0, 0)
            for i in range(media.shape[1])
        ]
        blocks = blocks_by_hand(places, 2)
        real = inputs["attention_mask"][b].bool().tolist()
        kept = [i for i, place in enumerate(places) if real[i] and (place is None or i in blocks)]
        means = {i: embeds[b, block].float().mean(0).to(embeds.dtype) for i, block in blocks.items()}
        rows.append(torch.stack([means[i] if i in means else embeds[b, i] for i in kept]))
        kept_positions.append(positions[:, b, kept])
    pooled, mask = left_pad(rows)
    at = torch.zeros(3, *mask.shape, dtype=torch.long)
    for b, p in enumerate(kept_positions):
        at[:, b, mask.shape[1] - p.shape[1] :] = p
    reference = model(inputs_embeds=pooled, attention_mask=mask, position_ids=at, use_cache=False).logits
    with vtexit.pool(model, stride=2) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        first = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True).logits[0]
    assert layout.valid.sum(1).tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(logits[layout.valid], reference[mask.bool()], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(first, reference[:, -1], atol=2e-5, rtol=1e-4)


def test_pool_refuses_a_family_without_a_grid_and_bad_strides():
    model = build_tiny("internvl", num_layers=4).model
    without_grid = dataclasses.replace(family_for(model), visual_grid=None)
    with pytest.raises(ValueError, match="visual grid"):
        vtexit.pool(model, family=without_grid)
    side = int(model.config.vision_config.image_size[0] // model.config.vision_config.patch_size[0] * 0.5)
    with pytest.raises(ValueError, match=f"larger than this model's {side} x {side} grid"):
        vtexit.pool(model, stride=side + 1)  # a tile's grid after pixel shuffle is fixed by the config
    assert vtexit.patch_of(model) is None
    with pytest.raises(ValueError, match="stride must be"):
        vtexit.PoolConfig(stride=1)
