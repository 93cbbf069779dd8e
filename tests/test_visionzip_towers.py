"""VisionZip on towers whose prompt tokens are groups of patches (InternViT, SigLIP in Gemma3 and Idefics3, the
Qwen-VL vision transformers), against a reference that shares nothing with vtexit's VisionZip code: the scored
block's input caught by a hook, its attention worked out per head as softmax(QK^T / sqrt(d)) in float64 (Qwen's
rotary embedding through transformers' own function), each prompt token's patches written down from the geometry
(2x2 neighbours, Gemma3's pooling window; Qwen2.5-VL's window order recovered by matching the patch embeddings with
the first block's input), the choice by sorting and the merge by loops; then the unpatched language model on the
reduced prompt built by hand (kept tokens at their slots' embeddings, contextual targets replaced by their group's
mean, M-RoPE columns of the full prompt, Gemma3's token types, Qwen3-VL's deepstack rows merged alike)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from reduced_prompt import check_against_reduced_prompt
from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

import vtexit
from vtexit.core.transformers_compat import generate_encodes_media_first
from vtexit.methods.visionzip.selection import attention_received
from vtexit.methods.visionzip.towers import find_qwen_groups, find_vit_groups
from vtexit.testing.build import instantiate
from vtexit.testing.config_kwargs import vit_kwargs
from vtexit.testing.tiny_models import build_tiny

KEEP, SHARE = 0.5, 0.25
VIT = ("internvl", "idefics3", "gemma3", "llava_siglip")
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def make_case(name: str, **overrides):
    """A tiny model whose vision attention is far from uniform: the tiny models' query/key weights (std 0.02) give
    scores equal to float precision, which would leave the choice to rounding (and a zero CLS token, uniform).
    ``llava_siglip``: LLaVA-1.5's layout with a SigLIP tower (no CLS token, every patch a prompt token)."""
    case = siglip_llava() if name == "llava_siglip" else build_tiny(name, num_layers=4, **overrides)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    core = case.model.model
    tower = getattr(core, "visual", None) or getattr(core, "vision_tower", None) or core.vision_model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in tower.named_parameters():
            if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "qkv") and name.endswith("weight"):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
            if name.endswith("cls_token"):  # InternViT's starts at zero: its query would be the bias alone
                weight.copy_(torch.randn(weight.shape, generator=generator))
    return case


def siglip_llava():
    base = build_tiny("llava", num_layers=4)
    top = {k: v for k, v in base.model.config.to_dict().items() if k not in ("text_config", "vision_config")}
    top.update(vision_feature_select_strategy="full", vision_feature_layer=-2)
    vision = SiglipVisionConfig(**{**vit_kwargs(16, 4), "num_hidden_layers": 2, "vision_use_head": False})
    config = LlavaConfig(**{**top, "text_config": base.model.config.text_config, "vision_config": vision})
    model = instantiate(LlavaForConditionalGeneration, config, "sdpa", seed=0)
    model.generation_config = base.model.generation_config
    return replace(base, model=model)


def counts(tokens: int) -> tuple[int, int]:
    """Round half up of KEEP x tokens (at least one), of which round half up of SHARE x that contextual (at least
    one dominant)."""
    kept = max(1, int(KEEP * tokens + 0.5))
    contextual = min(kept - 1, int(SHARE * kept + 0.5))
    return kept - contextual, contextual


def zip_by_hand(scores, keys, dominant: int, contextual: int) -> tuple[list[int], dict[int, list[int]]]:
    """VisionZip on one image's prompt tokens: the dominant ones (highest score first, ties to the lower index) and
    each contextual target with the tokens that joined it (most cosine-similar key)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = sorted(order[:dominant])
    rest = [i for i in range(len(scores)) if i not in chosen]
    targets = rest[:: max(1, len(rest) // contextual)][:contextual] if contextual else []
    groups = {t: [t] for t in targets}
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    for i in rest:
        if i not in groups:
            groups[targets[int(np.argmax([unit[i] @ unit[t] for t in targets]))]].append(i)
    return chosen, groups


def grid_groups(side: int, kernel: int) -> list[list[int]]:
    """Prompt tokens of a ``side`` x ``side`` patch grid pooled in ``kernel`` x ``kernel`` windows, row-major."""
    out = side // kernel
    return [
        [(kernel * r + a) * side + kernel * c + b for a in range(kernel) for b in range(kernel)]
        for r in range(out)
        for c in range(out)
    ]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def per_head(x: torch.Tensor, heads: int) -> np.ndarray:
    """(length, heads x head_dim) -> (heads, length, head_dim) float64."""
    return x.double().view(x.shape[0], heads, -1).transpose(0, 1).numpy()


def attention(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    return softmax(q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]))


class Capture:
    """Hooks on the unpatched model: the scored block's input, the language model's inputs, and (Qwen) the patch
    embeddings and the first block's input, whose rows give the window order."""

    def __init__(self, case, inputs: dict, block: torch.nn.Module):
        model = case.model
        language_model = getattr(model.model, "language_model", None) or model.model.text_model
        seen: dict = {}
        hooks = [
            block.register_forward_pre_hook(lambda m, a, k: seen.update(block=(a, k)), with_kwargs=True),
            language_model.register_forward_pre_hook(lambda m, a, k: seen.update(lm=k), with_kwargs=True),
        ]
        visual = getattr(model.model, "visual", None)
        if visual is not None:
            hooks.append(visual.patch_embed.register_forward_hook(lambda m, a, out: seen.update(embed=out)))
            hooks.append(visual.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(first=a[0])))
        try:
            with torch.no_grad():
                model(**inputs, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        self.language_model = language_model
        self.block_args, self.block_kwargs = seen["block"]
        self.lm = seen["lm"]
        self.embed, self.first = seen.get("embed"), seen.get("first")


def vit_block(case):
    config, core = case.model.config, case.model.model
    layers = {
        "internvl": lambda: core.vision_tower.encoder.layer,
        "gemma3": lambda: core.vision_tower.encoder.layers,
        "idefics3": lambda: core.vision_model.encoder.layers,
        "llava": lambda: core.vision_tower.encoder.layers,
        "llava_next": lambda: core.vision_tower.encoder.layers,
        "llava_onevision": lambda: core.vision_tower.encoder.layers,
    }[case.name]()
    layer = getattr(config, "vision_feature_layer", -1)
    return layers[layer % (config.vision_config.num_hidden_layers + 1) - 1]


@torch.no_grad()
def vit_images(case, seen: Capture) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tower row: (tokens,) scores and (tokens, head_dim) keys."""
    name, block = case.name, vit_block(case)
    vision = case.model.config.vision_config
    hidden = seen.block_args[0]
    attn = block.attention if name == "internvl" else block.self_attn
    norm = block.layernorm_before if name == "internvl" else block.layer_norm1
    heads, cls = vision.num_attention_heads, name == "internvl"
    size, patch = (v if isinstance(v, int) else v[0] for v in (vision.image_size, vision.patch_size))
    side = size // patch
    kernel = {"gemma3": side // round(getattr(case.model.config, "mm_tokens_per_image", 1) ** 0.5), "llava": 1}
    kernel = kernel.get(name, 2)
    groups = grid_groups(side, kernel)
    out = []
    for row in hidden:
        x = norm(row)
        q, k = per_head(attn.q_proj(x), heads), per_head(attn.k_proj(x), heads)
        a = attention(q, k)
        patch_scores = a[:, 0, 1:].sum(axis=0) if cls else a.mean(axis=0).mean(axis=0)
        patch_keys = k.mean(axis=0)[1:] if cls else k.mean(axis=0)
        out.append(
            (np.array([patch_scores[g].sum() for g in groups]), np.stack([patch_keys[g].mean(axis=0) for g in groups]))
        )
    return out


@torch.no_grad()
def qwen_images(case, inputs: dict, seen: Capture) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: scores and keys of its merged tokens (4 patches each) in the prompt's order."""
    visual = case.model.model.visual
    block = qwen_block(visual)
    hidden, kwargs = seen.block_args[0], seen.block_kwargs
    heads = visual.config.num_heads
    order = torch.arange(hidden.shape[0])  # block row -> the patch in the prompt's order
    if getattr(visual.config, "fullatt_block_indexes", None) is not None:  # 2.5-VL: the blocks see window order,
        order = torch.cdist(seen.first.double(), seen.embed.double()).argmin(dim=1)  # the embeddings permuted
    length = hidden.shape[0]
    q, k, _ = block.attn.qkv(block.norm1(hidden)).view(length, 3, heads, -1).unbind(1)
    cos, sin = kwargs["position_embeddings"]
    turned_q, turned_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    scores, keys = np.zeros(length), np.zeros((length, q.shape[-1]))
    bounds = kwargs["cu_seqlens"].tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        att = attention(turned_q[a:b].double().transpose(0, 1).numpy(), turned_k[a:b].double().transpose(0, 1).numpy())
        scores[order[a:b].numpy()] = att.mean(axis=0).mean(axis=0)
    keys[order.numpy()] = k.double().mean(dim=1).numpy()
    out, start = [], 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        n = t * h * w
        part = slice(start, start + n)
        out.append((scores[part].reshape(-1, 4).sum(axis=1), keys[part].reshape(-1, 4, keys.shape[1]).mean(axis=1)))
        start += n
    return out


def qwen_block(visual) -> torch.nn.Module:
    full = getattr(visual.config, "fullatt_block_indexes", None)
    return visual.blocks[max(full) if full else len(visual.blocks) - 1]


@torch.no_grad()
def reduced_prompt(case, inputs: dict, images_of=None) -> tuple[list[list[int]], dict]:
    """Per row the kept prompt positions, and the language model's kwargs for the reduced prompt (left-padded).
    ``images_of(case, inputs, seen)``: per image its scores, keys and, where the image's block of slots holds more
    (newline tokens), the offsets of its scored tokens in the block and the block's length."""
    model = case.model
    block = qwen_block(model.model.visual) if case.name in QWEN else vit_block(case)
    seen = Capture(case, inputs, block)
    if images_of is None:
        images_of = qwen_images if case.name in QWEN else lambda case, inputs, seen: vit_images(case, seen)
    images = images_of(case, inputs, seen)
    embeds = seen.lm["inputs_embeds"].clone()
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    slots = media.flatten().nonzero().flatten()  # the visual slots in the order images fill them
    deepstack = [d.clone() for d in seen.lm.get("deepstack_visual_embeds") or []]
    keep_flat = torch.zeros(len(slots), dtype=torch.bool)
    start = 0
    for scores, keys, *block in images:
        offsets, length = block or (range(len(scores)), len(scores))
        place = [start + offset for offset in offsets]  # each scored token's place among the visual slots
        chosen, groups = zip_by_hand(scores, keys, *counts(len(scores)))
        for i in chosen:
            keep_flat[place[i]] = True
        for target, members in groups.items():
            keep_flat[place[target]] = True
            rows = [int(slots[place[m]]) for m in members]
            flat = embeds.view(-1, embeds.shape[-1])
            flat[slots[place[target]]] = flat[rows].double().mean(dim=0).to(flat.dtype)
            for features in deepstack:
                features[place[target]] = features[[place[m] for m in members]].double().mean(0).to(features.dtype)
        start += length
    assert start == len(slots)
    keep = ~media & inputs["attention_mask"].bool()
    keep.view(-1)[slots] = keep_flat
    kept = [row.nonzero().flatten().tolist() for row in keep]
    longest = max(len(row) for row in kept)
    batch = len(kept)
    out = {
        "inputs_embeds": embeds.new_zeros(batch, longest, embeds.shape[-1]),
        "attention_mask": torch.zeros(batch, longest, dtype=torch.long),
    }
    positions = seen.lm.get("position_ids")
    if positions is not None and positions.ndim == 3:  # M-RoPE: the full prompt's (t, h, w) columns
        out["position_ids"] = torch.zeros(3, batch, longest, dtype=torch.long)
    if "token_type_ids" in inputs:
        out["token_type_ids"] = torch.zeros(batch, longest, dtype=torch.long)
    visual = torch.zeros(batch, longest, dtype=torch.bool)
    for b, row in enumerate(kept):
        index, pad = torch.tensor(row), longest - len(row)
        out["inputs_embeds"][b, pad:] = embeds[b, index]
        out["attention_mask"][b, pad:] = 1
        visual[b, pad:] = media[b, index]
        if "position_ids" in out:
            out["position_ids"][:, b, pad:] = positions[-3:, b, index]
        if "token_type_ids" in out:
            out["token_type_ids"][b, pad:] = inputs["token_type_ids"][b, index]
    if deepstack:
        out["visual_pos_masks"] = visual
        out["deepstack_visual_embeds"] = [features[keep_flat] for features in deepstack]
    return kept, out


@torch.no_grad()
def beam_reference(case, inputs: dict, beams: dict, images_of=None) -> torch.Tensor:
    """The unpatched model's beams on the reduced prompt of what generate's prefill holds. Where generate encodes the
    media first (transformers 5.25), each row's copies hold the row's images: the reduced prompt of ``inputs``. Where
    it repeats the pixel inputs instead (5.17), each pixel entry is repeated in place, so the copies of a row with
    more than one entry hold other images than the row's (the unpatched model's too, see transformers_compat
    .generate_encodes_media_first): the reference reduces the inputs as repeated, and since beam search extends only
    each row's first copy at the first step (the others start at -1e9), that copy's reduced prompt gives the row's
    beams."""
    model = case.model
    if generate_encodes_media_first(model):
        return model.generate(**reduced_prompt(case, inputs, images_of)[1], **beams)
    copies = max(beams.get("num_beams", 1), beams.get("num_return_sequences", 1))
    repeated = {k: v.repeat_interleave(copies, dim=0) if torch.is_tensor(v) else v for k, v in inputs.items()}
    _, prompt = reduced_prompt(case, repeated, images_of)
    assert "deepstack_visual_embeds" not in prompt and "position_ids" not in prompt  # ViT towers only
    first = {k: v[::copies] for k, v in prompt.items()}
    pad = int((first["attention_mask"].sum(dim=0) == 0).sum())  # left-padding columns no first copy needs
    return model.generate(**{k: v[:, pad:] for k, v in first.items()}, **beams)


@torch.no_grad()
def reference_logits(case, prompt: dict) -> torch.Tensor:
    model = case.model
    if "deepstack_visual_embeds" in prompt:  # Qwen3-VL: the text model takes the deepstack features directly
        language_model = model.model.language_model
        return model.lm_head(language_model(**prompt, use_cache=False).last_hidden_state)
    return model(**prompt, use_cache=False).logits


@pytest.mark.parametrize(
    "name, overrides",
    [
        *[(name, {}) for name in VIT + QWEN],
        ("qwen2_5_vl", {"vision_config": {"fullatt_block_indexes": [0]}}),  # the scored block is not the last
    ],
)
@torch.no_grad()
def test_visionzip_keeps_what_the_hand_reference_keeps(name, overrides):
    case = make_case(name, **overrides)
    model = case.model
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3])
    before = model(**inputs, use_cache=False).logits
    kept, prompt = reduced_prompt(case, inputs)
    expected = reference_logits(case, prompt)
    config = vtexit.VisionZipConfig(keep=KEEP, contextual_share=SHARE)
    with vtexit.apply(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    for b, row in enumerate(kept):  # the same tokens, in the prompt's order
        assert layout.index[b][layout.valid[b]].tolist() == row
    torch.testing.assert_close(logits[layout.valid], expected[prompt["attention_mask"].bool()], atol=2e-5, rtol=1e-4)
    assert torch.equal(model(**inputs, use_cache=False).logits, before)  # removed: the model as it was


@pytest.mark.parametrize("name", ["internvl", "idefics3", "llava_siglip"])
@torch.no_grad()
def test_visionzip_generates_as_the_unpatched_model_on_the_reduced_prompt(name):
    case = make_case(name)
    inputs = case.inputs([2, 1], text_len=[4, 6])
    _, prompt = reduced_prompt(case, inputs)
    config = vtexit.VisionZipConfig(keep=KEEP, contextual_share=SHARE)
    patch = lambda m: vtexit.apply(m, config)  # noqa: E731
    check_against_reduced_prompt(case.model, inputs, prompt["inputs_embeds"], prompt["attention_mask"], patch, 3)


@torch.no_grad()
def test_attention_received_in_blocks_of_queries_equals_the_whole_matrix():
    generator = torch.Generator().manual_seed(1)
    query, keys = torch.randn(2, 3, 7, 4, generator=generator), torch.randn(2, 3, 7, 4, generator=generator)
    expected = attention(query.double().numpy().reshape(6, 7, 4), keys.double().numpy().reshape(6, 7, 4))
    expected = expected.reshape(2, 3, 7, 7).mean(axis=(1, 2))
    for block in (1, 20, 10**6):  # one query row per block, a few, all at once
        np.testing.assert_allclose(attention_received(query, keys, block).numpy(), expected, rtol=1e-5)


def test_visionzip_refuses_videos_on_qwen():
    case = make_case("qwen2_vl")
    inputs = case.inputs([0, 1], videos_per_row=[1, 0], text_len=[4, 6])
    with vtexit.visionzip(case.model, keep=KEEP), pytest.raises(ValueError, match="images only"):
        case.model(**inputs, use_cache=False)


@pytest.mark.parametrize("name", [*VIT, *QWEN])
@torch.no_grad()
def test_tower_scores_and_keys_equal_the_hand_reference(name):
    """The towers' scores and keys alone (no engine): what the reduced prompt above is chosen from."""
    case = make_case(name)
    inputs = case.inputs([2, 1], text_len=[4, 6])
    if name in QWEN:
        source = find_qwen_groups(case.model)
        seen = Capture(case, inputs, source.block)
        scores, keys = source.scores_and_keys(inputs["image_grid_thw"], seen.block_args, seen.block_kwargs)
        expected = qwen_images(case, inputs, seen)
        sizes = [len(s) for s, _ in expected]
        scores, keys = scores.split(sizes), keys.split(sizes)
    else:
        source = find_vit_groups(case.model, case.name)
        seen = Capture(case, inputs, source.block)
        scores, keys = source.scores_and_keys(seen.block_args[0])
        expected = vit_images(case, seen)
    assert len(scores) == len(expected)
    for got_scores, got_keys, (want_scores, want_keys) in zip(scores, keys, expected, strict=True):
        np.testing.assert_allclose(got_scores.numpy(), want_scores, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got_keys.numpy(), want_keys, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_beam_search_copies_keep_what_their_row_keeps():
    """generate encodes each row's images once and repeats them for the row's beams: every copy keeps its row's
    (transformers 5.25; 5.17 repeats the pixel inputs before the prefill instead, see beam_reference)."""
    case = make_case("internvl")
    inputs = case.inputs([2, 0, 1], text_len=[4, 5, 6])
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    expected = beam_reference(case, inputs, beams)
    with vtexit.apply(case.model, vtexit.VisionZipConfig(keep=KEEP, contextual_share=SHARE)):
        result = case.model.generate(**inputs, **beams)
    assert result[:, inputs["input_ids"].shape[1] :].tolist() == expected.tolist()
