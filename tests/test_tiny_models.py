"""The tiny-model builders are the ground the family tests stand on, so check them on their own.

The property that could silently break is the placeholder count: the builders compute how many media
tokens each image/video expands to (anyres unpadding, pixel shuffle, spatial merges, pooling, ...)
without any processor, and that has to equal what the real model's vision path produces.
"""

from __future__ import annotations

import sys

import pytest
import torch
from packaging.version import Version

from vtexit.testing.tiny_models import FAMILIES, TinyCase, build_llava_shaped, build_tiny

torch.set_num_threads(1)

ROWS = [1, 0, 2]
TEXT = [5, 9, 3]
# Inputs of get_image_features, per family (everything else in the batch is for the LM).
IMAGE_KEYS = {
    "llava": ("pixel_values",),
    "llava_next": ("pixel_values", "image_sizes"),
    "llava_onevision": ("pixel_values", "image_sizes", "batch_num_images"),
    "qwen2_vl": ("pixel_values", "image_grid_thw"),
    "qwen2_5_vl": ("pixel_values", "image_grid_thw"),
    "qwen3_vl": ("pixel_values", "image_grid_thw"),
    "internvl": ("pixel_values",),
    "idefics3": ("pixel_values", "pixel_attention_mask"),
    "gemma3": ("pixel_values",),
}
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")
# Families whose get_image_features returns one tensor per image (so per-image counts can be checked).
PER_IMAGE_OUTPUT = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


@pytest.fixture(scope="module", params=FAMILIES)
def case(request) -> TinyCase:
    return build_tiny(request.param)


def _videos(case: TinyCase) -> list[int] | None:
    return [1, 0, 0] if case.supports_video else None


def _vectors(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], width: int) -> int:
    items = features if isinstance(features, (list, tuple)) else [features]
    return sum(t.numel() for t in items) // width


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True, row by row."""
    out: list[int] = []
    for row in mask.tolist():
        n = 0
        for v in [*row, False]:
            if v:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out


def test_registry() -> None:
    assert len(set(FAMILIES)) == len(FAMILIES) == 9
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny("not_a_family")


def test_each_family_lives_in_its_own_module() -> None:
    """Config builder and input builder sit together in ``families/<name>.py``; both import paths agree."""
    import vtexit.testing as testing
    from vtexit.testing.families import TINY_FAMILIES

    assert tuple(f.name for f in TINY_FAMILIES) == FAMILIES == testing.FAMILIES
    for family in TINY_FAMILIES:
        module = f"vtexit.testing.families.{family.name}"
        assert family.build_config.__module__ == family.input_spec.__module__ == module
    assert (testing.TinyCase, testing.build_tiny, testing.build_llava_shaped) == (
        TinyCase,
        build_tiny,
        build_llava_shaped,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_ragged_left_padded_batch(family: str, attn: str) -> None:
    case = build_tiny(family, attn_implementation=attn)
    model = case.model
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.get_text_config()._attn_implementation == attn
    inputs = case.inputs(ROWS, text_len=TEXT)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == len(ROWS), "rows should differ in length"
    # left padding: zeros then ones, pad id exactly where the mask is 0
    assert torch.equal(mask, mask.sort(dim=1).values)
    assert torch.equal(ids == case.pad_token_id, mask == 0)
    media = case.media_mask(inputs)
    assert media.sum(1)[1] == 0 and bool((media.sum(1)[[0, 2]] > 0).all())
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_image_tokens_match_image_features(case: TinyCase) -> None:
    inputs = case.inputs(ROWS, text_len=TEXT)
    width = case.model.config.get_text_config().hidden_size
    with torch.no_grad():
        out = case.model.get_image_features(**{k: inputs[k] for k in IMAGE_KEYS[case.name]})
    image_mask = case.media_mask(inputs, "image")
    assert _vectors(out.pooler_output, width) == int(image_mask.sum())
    if case.name in PER_IMAGE_OUTPUT:
        assert [t.shape[0] for t in out.pooler_output] == _runs(image_mask)


def test_video_tokens_match_video_features(case: TinyCase) -> None:
    if not case.supports_video:
        with pytest.raises(ValueError, match="video"):
            case.inputs([0, 1], videos_per_row=[0, 1])
        return
    inputs = case.inputs([0, 1], videos_per_row=[1, 1], text_len=[4, 7])
    width = case.model.config.get_text_config().hidden_size
    with torch.no_grad():
        # The frames go first, positionally: the parameter is `pixel_values` in transformers 5.17, renamed
        # `pixel_values_videos` by 5.20.
        rest = {k: inputs[k] for k in VIDEO_KEYS[1:] if k in inputs}
        out = case.model.get_video_features(inputs[VIDEO_KEYS[0]], **rest)
    video_tokens = int(case.media_mask(inputs, "video").sum())
    if case.name == "llava_onevision" and Version(sys.modules["transformers"].__version__) < Version("5.18"):
        video_tokens -= len(inputs[VIDEO_KEYS[0]])  # 5.17 appends each video's newline vector in forward instead
    assert _vectors(out.pooler_output, width) == video_tokens
    with torch.no_grad():  # the forward itself refuses a count of video tokens that its features do not fill
        logits = case.model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_batch_rows_equal_single_rows(case: TinyCase) -> None:
    """Padding, attention mask and per-row media tensors are assembled consistently."""
    kwargs = dict(text_len=[5, 9, 3, 2], videos_per_row=[1, 0, 0, 1] if case.supports_video else None)
    rows = [1, 0, 2, 3]
    batch = case.inputs(rows, **kwargs)
    singles = case.row_inputs(rows, **kwargs)
    with torch.no_grad():
        batched = case.model(**batch).logits
        for b, single in enumerate(singles):
            alone = case.model(**single).logits[0]
            torch.testing.assert_close(batched[b, batch["attention_mask"][b].bool()], alone, atol=1e-4, rtol=1e-4)


def test_inputs_are_seeded_and_text_avoids_special_ids(case: TinyCase) -> None:
    a = case.inputs(ROWS, text_len=TEXT, videos_per_row=_videos(case), seed=3)
    b = case.inputs(ROWS, text_len=TEXT, videos_per_row=_videos(case), seed=3)
    c = case.inputs(ROWS, text_len=TEXT, videos_per_row=_videos(case), seed=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    lo, hi = case.text_id_range
    ids = a["input_ids"][a["attention_mask"].bool()]
    is_text = (ids >= lo) & (ids < hi)
    assert not torch.isin(ids[is_text], torch.tensor(sorted(case.special_token_ids))).any()
    assert torch.equal(~is_text, torch.isin(ids, torch.tensor(sorted(case.special_token_ids))))


def test_generate_never_emits_special_ids(case: TinyCase) -> None:
    inputs = case.inputs(ROWS, text_len=TEXT)
    out = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (len(ROWS), 3)
    allowed = case.special_token_ids - {case.model.generation_config.eos_token_id}
    assert not torch.isin(new, torch.tensor(sorted(allowed))).any()


def test_configs_have_the_shapes_the_tests_rely_on(case: TinyCase) -> None:
    text = case.model.config.get_text_config()
    assert text.pad_token_id == case.pad_token_id
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert text.hidden_size <= 64 and text.vocab_size <= 256
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if case.name.startswith("qwen"):
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    if case.name == "qwen3_vl":
        assert len(case.model.config.vision_config.deepstack_visual_indexes) in (1, 2)
    if case.name == "gemma3":
        assert text.layer_types.index("full_attention") == 1
        assert text.sliding_window < case.model.config.mm_tokens_per_image


def test_gemma3_image_features_are_not_degenerate() -> None:
    """transformers zero-initialises Gemma 3's projection; the builder re-draws it."""
    case = build_tiny("gemma3")
    inputs = case.inputs([1])
    with torch.no_grad():
        feats = case.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert feats.abs().amax() > 0


def test_llava_shaped_gives_requested_tokens() -> None:
    case = build_llava_shaped(
        hidden_size=64, num_layers=2, image_tokens=16, num_heads=4, intermediate_size=96, vocab_size=256
    )
    inputs = case.inputs([1, 2], text_len=[3, 6])
    assert case.media_mask(inputs).sum(1).tolist() == [16, 32]
    with torch.no_grad():
        out = case.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert [t.shape[0] for t in out.pooler_output] == [16, 16, 16]
    with pytest.raises(ValueError, match="square"):
        build_llava_shaped(image_tokens=10)
