"""Visual-grid pooling before the language model against the unpatched model on the pooled prompt built by hand
(each image's 2 x 2 blocks averaged with plain loops, fed as ``inputs_embeds``), forward and cached generate."""

from __future__ import annotations

import math

import pytest
import torch
from reduced_prompt import check_against_reduced_prompt, greedy_case, layer0_inputs, left_pad, rebuild_rows
from reference import record_layer_inputs, scheduled_logits

import vtexit
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


@pytest.mark.parametrize("family, why", [("llava_next", "visual grid"), ("qwen2_vl", "not supported for")])
def test_pool_refuses_families_it_cannot_describe(family, why):
    model = build_tiny(family, num_layers=4).model
    with pytest.raises(ValueError, match=why):
        vtexit.pool(model)
    assert vtexit.patch_of(model) is None
    with pytest.raises(ValueError, match="stride must be"):
        vtexit.PoolConfig(stride=1)
