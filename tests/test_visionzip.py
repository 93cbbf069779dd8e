"""VisionZip before the language model, against an independent reference: the vision tower's attention from
transformers' own eager attention (``output_attentions``), its keys caught at the key projection, VisionZip's rule
worked out in float64 with plain loops, and the unpatched model run on the reduced prompt built by hand (the zipped
tokens through the projector, fed as ``inputs_embeds``), forward and cached generate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reduced_prompt import check_against_reduced_prompt, layer0_inputs, left_pad, rebuild_rows
from reference import record_layer_inputs, scheduled_logits
from transformers import Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

import vtexit
from vtexit.methods.visionzip import split_tokens
from vtexit.testing.build import instantiate, make_case
from vtexit.testing.config_kwargs import vit_kwargs
from vtexit.testing.families.llava import LlavaInputSpec
from vtexit.testing.tiny_models import build_tiny
from vtexit.testing.vocab import TINY_VOCAB_SIZE, Vocab

KEEP = 0.5  # 8 of 16 tokens per image: 7 dominant (CLS included) + 1 contextual at the paper's share
SHARE = 0.25  # 2 contextual tokens of 8, so that merging has several targets to choose from


def clip_case():
    """LLaVA-1.5's layout: CLIP tower, features from the second-to-last layer."""
    case = build_tiny("llava", num_layers=4, vision_config={"num_hidden_layers": 3}, vision_feature_layer=-2)
    return _greedy(case)


def dinov2_case():
    """The default model's layout: DINOv2 tower, features from the last layer."""
    base = build_tiny("llava", num_layers=4).model.config
    vision = Dinov2Config(**{**vit_kwargs(16, 4), "num_hidden_layers": 2})
    config = LlavaConfig(**{**base.to_dict(), "vision_config": vision.to_dict()})
    model = instantiate(LlavaForConditionalGeneration, config, "sdpa", seed=0)
    return _greedy(make_case("llava", model, Vocab(TINY_VOCAB_SIZE), LlavaInputSpec))


def _greedy(case):
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


def zip_by_hand(features, attention, keys, dominant: int, contextual: int) -> np.ndarray:
    """VisionZip for one image in float64 with loops: ``attention`` (heads, tokens, tokens), CLS first."""
    cls = attention.sum(axis=0)[0]
    patches = sorted(range(1, len(cls)), key=lambda i: (-cls[i], i))[: dominant - 1]
    chosen = [0, *sorted(patches)]
    rest = [i for i in range(len(cls)) if i not in chosen]
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = rest[::step][:contextual]
    groups = {t: [t] for t in targets}
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    for i in rest:
        if i not in groups:
            similarity = [float(unit[i] @ unit[t]) for t in targets]
            groups[targets[int(np.argmax(similarity))]].append(i)
    merged = [features[groups[t]].mean(axis=0) for t in targets]
    return np.stack([features[i] for i in chosen] + merged)


def _key_projection(block):
    names = ("k_proj", "key")
    return next(m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in names)


@torch.no_grad()
def reduced_prompt(case, inputs: dict, keep: float, share: float):
    """Each row's first-layer inputs with every image's visual tokens replaced by its zipped tokens through the
    projector, left-padded; the tower's attention comes from transformers' eager attention. Also, per row, whether
    each reduced token is visual."""
    model = copy.deepcopy(case.model)
    model.model.vision_tower.set_attn_implementation("eager")
    config = model.config
    tower = model.model.vision_tower
    index = config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
    block = next(m for m in tower.modules() if isinstance(m, torch.nn.ModuleList))[index - 1]
    heads = config.vision_config.num_attention_heads
    seen = {}
    hook = _key_projection(block).register_forward_hook(lambda m, a, out: seen.update(keys=out))
    try:
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        hook.remove()
    features, attention = out.hidden_states[index], out.attentions[index - 1]
    keys = seen["keys"].view(*seen["keys"].shape[:2], heads, -1).mean(dim=2)
    patches = config.image_seq_length
    dominant, contextual = split_tokens(patches, keep, share)
    zipped = [
        zip_by_hand(features[i].double().numpy(), attention[i].double().numpy(), keys[i].double().numpy(),
                    dominant, contextual)
        for i in range(features.shape[0])
    ]
    projected = model.model.multi_modal_projector(torch.tensor(np.stack(zipped), dtype=torch.float32))
    embeds = layer0_inputs(case.model, inputs)
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    images = iter(projected)  # the batch's images in order, each row's in its order

    def zipped_image(b: int, i: int, seen: int) -> list[torch.Tensor]:
        return list(next(images)) if seen % patches == 0 else []  # an image's first token brings its zipped tokens

    rows, flags = rebuild_rows(embeds, inputs, media, zipped_image)
    assert next(images, None) is None
    return (*left_pad(rows), flags)


@pytest.fixture(scope="module", params=["clip", "dinov2"])
def case(request):
    return clip_case() if request.param == "clip" else dinov2_case()


@torch.no_grad()
@pytest.mark.parametrize("images_per_row, text_len", [([1], [6]), ([1, 2, 0], [5, 3, 7])])
def test_visionzip_equals_the_unpatched_model_on_the_reduced_prompt(case, images_per_row, text_len):
    inputs = case.inputs(images_per_row, text_len=text_len)
    embeds, mask, _ = reduced_prompt(case, inputs, KEEP, SHARE)
    config = vtexit.VisionZipConfig(keep=KEEP, contextual_share=SHARE)
    check_against_reduced_prompt(case.model, inputs, embeds, mask, lambda m: vtexit.apply(m, config), steps=4)


@torch.no_grad()
def test_visionzip_at_the_papers_share_and_remove_restores_the_model():
    case = clip_case()
    inputs = case.inputs([2, 1], text_len=[4, 6])
    embeds, mask, _ = reduced_prompt(case, inputs, 0.25, 10 / 64)
    patch = lambda m: vtexit.visionzip(m, keep=0.25)  # noqa: E731
    check_against_reduced_prompt(case.model, inputs, embeds, mask, patch, steps=3)
    check_against_reduced_prompt(case.model, inputs, embeds, mask, patch, steps=3, cache_implementation="static")
    before = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output
    handle = vtexit.visionzip(case.model, keep=0.25)
    handle.remove()
    after = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not case.model.model.vision_tower._forward_hooks and not case.model.model.vision_tower._forward_pre_hooks


@torch.no_grad()
def test_visionzip_then_vtw_equals_layers_run_by_hand():
    case, layer = clip_case(), 2
    inputs = case.inputs([1, 2], text_len=[5, 3])
    embeds, mask, flags = reduced_prompt(case, inputs, KEEP, SHARE)
    seen = record_layer_inputs(case.model, {"inputs_embeds": embeds, "attention_mask": mask})
    pre = {"method": "visionzip", "keep": KEEP, "contextual_share": SHARE}
    with vtexit.hybrid(case.model, pre=pre, then={"method": "vtw", "layer": layer}) as handle:
        logits = case.model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    for b, visual in enumerate(flags):
        pad = int((mask[b] == 0).sum())
        text = torch.tensor([pad + j for j, is_visual in enumerate(visual) if not is_visual])
        expected = scheduled_logits(case.model, seen, b, [(layer, text)])
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)


def test_token_split_matches_the_papers_llava_settings():
    # VisionZip, Table 1 (LLaVA-1.5, 576 tokens): 54 + 10, 108 + 20, 162 + 30.
    assert [split_tokens(576, n / 576, 10 / 64) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_tokens(16, 1 / 16, 0.5) == (1, 0)  # the CLS token alone


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("llava_next", {"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
        ("internvl", {"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
        ("llava", {"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
        ("llava", {"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
        ("llava", {"vision_feature_layer": 0}, "vision_feature_layer"),
    ],
)
def test_visionzip_refuses_what_it_cannot_zip(name, overrides, match):
    model = build_tiny(name, num_layers=4, **overrides).model
    with pytest.raises(ValueError, match=match):
        vtexit.visionzip(model, keep=0.5)
    assert vtexit.patch_of(model) is None


def test_visionzip_refuses_bad_settings():
    with pytest.raises(ValueError, match="keep must be in"):
        vtexit.VisionZipConfig(keep=0.0)
    with pytest.raises(ValueError, match="contextual_share"):
        vtexit.VisionZipConfig(keep=0.5, contextual_share=1.0)
    assert vtexit.config_from_dict({"method": "visionzip", "keep": "0.25"}) == vtexit.VisionZipConfig(keep=0.25)
