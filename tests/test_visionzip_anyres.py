"""VisionZip on LLaVA-NeXT (CLIP tower, CLS token) and LLaVA-OneVision (SigLIP, none), whose prompt holds each image
as a base view, its unpadded tiles and a newline token per row of tiles. The reference (test_visionzip_towers' hand
reference) scores each tile's patches in float64 from the scored layer's input, lays the scores and keys out with
transformers' own ``pack_image_features`` (the model's, before the patch wraps it), finds the newline slots as the
first-layer inputs equal to the model's ``image_newline``, chooses among the other slots of each image by sorting
and merges by loops; then the unpatched model on the reduced prompt (logits, generate, beams)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reduced_prompt import check_against_reduced_prompt
from test_visionzip_towers import (
    KEEP,
    SHARE,
    Capture,
    attention,
    beam_reference,
    make_case,
    per_head,
    reduced_prompt,
    vit_block,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtexit

CONFIG = vtexit.VisionZipConfig(keep=KEEP, contextual_share=SHARE)


@torch.no_grad()
def tile_scores(case, seen: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, patches) scores and (tiles, patches, head_dim) keys: the CLS token's attention (CLIP) or the attention
    each patch receives (SigLIP), per tile, in float64."""
    block = vit_block(case)
    heads = case.model.config.vision_config.num_attention_heads
    cls = case.model.config.vision_config.model_type == "clip_vision_model"
    scores, keys = [], []
    for row in seen.block_args[0]:
        x = block.layer_norm1(row)
        q, k = per_head(block.self_attn.q_proj(x), heads), per_head(block.self_attn.k_proj(x), heads)
        a = attention(q, k)
        scores.append(a[:, 0, 1:].sum(axis=0) if cls else a.mean(axis=0).mean(axis=0))
        keys.append(k.mean(axis=0)[1:] if cls else k.mean(axis=0))
    return torch.tensor(np.stack(scores)), torch.tensor(np.stack(keys))


@torch.no_grad()
def anyres_images(case, inputs: dict, seen: Capture) -> list:
    """Per image: its scored tokens' scores and keys, their offsets in the image's block of slots, its length."""
    model, config = case.model, case.model.config
    scores, keys = tile_scores(case, seen)
    sizes = inputs["image_sizes"].tolist()
    tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) for s in sizes]
    if "batch_num_images" in inputs:  # OneVision tiles only the images of rows that hold one
        alone = [n == 1 for n in inputs["batch_num_images"].tolist() for _ in range(n)]
        tiles = [count if single else 1 for count, single in zip(tiles, alone, strict=True)]
    extra = {"vision_feature_select_strategy": config.vision_feature_select_strategy}
    if case.name == "llava_onevision":
        extra = {"vision_aspect_ratio": config.vision_aspect_ratio}
    pack = model.model.pack_image_features
    nan, zeros = torch.full((1,), torch.nan, dtype=scores.dtype), keys.new_zeros(keys.shape[-1])
    packed_scores, _ = pack(list(scores.unsqueeze(-1).split(tiles)), inputs["image_sizes"], image_newline=nan, **extra)
    packed_keys, _ = pack(list(keys.split(tiles)), inputs["image_sizes"], image_newline=zeros, **extra)
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    visual = seen.lm["inputs_embeds"][media]  # the first-layer inputs of the visual slots, in order
    newline = (visual == model.model.image_newline.to(visual.dtype)).all(dim=-1)
    images, start = [], 0
    for score, key in zip(packed_scores, packed_keys, strict=True):
        score = score[:, 0]
        length = len(score)
        offsets = [i for i in range(length) if not newline[start + i]]
        assert offsets == (~score.isnan()).nonzero().flatten().tolist()  # the packing's newlines are the model's
        images.append((score[offsets].numpy(), key[offsets].numpy(), offsets, length))
        start += length
    assert start == len(visual)
    return images


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
@torch.no_grad()
def test_visionzip_keeps_what_the_hand_reference_keeps_on_anyres_prompts(name):
    case = make_case(name)
    model = case.model
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3])
    before = model(**inputs, use_cache=False).logits
    kept, prompt = reduced_prompt(case, inputs, anyres_images)
    expected = model(**prompt, use_cache=False).logits
    with vtexit.apply(model, CONFIG) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    for b, row in enumerate(kept):  # the same tokens, in the prompt's order, no newline tokens
        assert layout.index[b][layout.valid[b]].tolist() == row
    torch.testing.assert_close(logits[layout.valid], expected[prompt["attention_mask"].bool()], atol=2e-5, rtol=1e-4)
    assert "pack_image_features" not in model.model.__dict__  # removed: the model's own method again
    assert torch.equal(model(**inputs, use_cache=False).logits, before)
    patch = lambda m: vtexit.apply(m, CONFIG)  # noqa: E731
    check_against_reduced_prompt(model, inputs, prompt["inputs_embeds"], prompt["attention_mask"], patch, 3)
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    reference = beam_reference(case, inputs, beams, anyres_images)
    with vtexit.apply(model, CONFIG):
        result = model.generate(**inputs, **beams)
    assert result[:, inputs["input_ids"].shape[1] :].tolist() == reference.tolist()


def test_visionzip_refuses_videos_on_onevision():
    case = make_case("llava_onevision")
    inputs = case.inputs([0, 1], videos_per_row=[1, 0], text_len=[4, 6])
    with vtexit.apply(case.model, CONFIG), pytest.raises(ValueError, match="not videos"):
        case.model(**inputs, use_cache=False)
    assert "pack_image_features" not in case.model.model.__dict__
