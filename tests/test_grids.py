"""Every family's visual grid against the one found by hand from the model's own vision features
(tests/grid_reference.py): which tokens share a frame, each token's row and column, the frame's size, and the prompt
positions from a token to the one below it."""

from __future__ import annotations

import pytest
import torch
from grid_reference import hand_places

from vtexit.core.families import family_for
from vtexit.core.grids import VisualGrid
from vtexit.testing.tiny_models import build_tiny

BATCHES = {
    "llava_next": dict(images_per_row=[1, 2, 0, 3], text_len=[5, 3, 7, 2]),
    # Rows of one image are anyres, rows of several base + newline; videos are frames + one newline.
    "llava_onevision": dict(images_per_row=[1, 2, 0, 1], videos_per_row=[0, 1, 1, 0], text_len=[5, 3, 7, 2]),
    "internvl": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
    "idefics3": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
    "gemma3": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
    "llava": dict(images_per_row=[1, 2, 0], text_len=[5, 3, 7]),
}


def family_grid(model, inputs: dict) -> VisualGrid:
    """The family's grid as a patched call computes it: from the media flags and the core kwargs it names."""
    family = family_for(model)
    media = family.media_mask(model.config, inputs["input_ids"])
    grid_inputs = {"input_ids": inputs["input_ids"], **{n: inputs.get(n) for n in family.grid_inputs}}
    return family.visual_grid(model.config, media, grid_inputs)


def check_grid(grid: VisualGrid, places: list) -> int:
    """``grid`` against the hand places; returns how many visual tokens were checked."""
    checked = 0
    for b, row in enumerate(places):
        labels: dict[int, object] = {}  # grid frame id -> hand label, one to one within the row
        where = {(p[0], p[1], p[2]): i for i, p in enumerate(row) if p is not None}
        for i, place in enumerate(row):
            frame = int(grid.frame[b, i])
            if place is None:
                assert frame == -1, (b, i)
                continue
            label, r, c, h, w = place
            assert labels.setdefault(frame, label) == label, (b, i, "two hand frames share a grid frame")
            got = tuple(int(g[b, i]) for g in (grid.row, grid.col, grid.height, grid.width))
            assert got == (r, c, h, w), (b, i, got, place)
            if r + 1 < h:  # the token below sits row_step positions further
                assert where[label, r + 1, c] - i == int(grid.row_step[b, i]), (b, i)
            checked += 1
        assert len(set(labels.values())) == len(labels), (b, "a hand frame split over grid frames")
    return checked


@pytest.mark.parametrize("name", list(BATCHES))
@torch.no_grad()
def test_grid_matches_the_model_s_own_features(name):
    case = build_tiny(name, num_layers=2)
    inputs = case.inputs(**BATCHES[name])
    places = hand_places(case.model, inputs)
    grid = family_grid(case.model, inputs)
    assert grid.frame.device == inputs["input_ids"].device
    visual = int(case.media_mask(inputs).sum())
    assert check_grid(grid, places) == visual > 0


@pytest.mark.parametrize(
    "name, overrides",
    [("llava_next", {}), ("llava_onevision", {}), ("llava_onevision", {"vision_aspect_ratio": "anyres_max_1"})],
    ids=["llava_next", "llava_onevision", "llava_onevision-shrunk"],
)
@torch.no_grad()
def test_anyres_grid_unpads_wide_tall_and_padded_images(name, overrides):
    """One anyres image per row, of each size the input spec cycles through (LLaVA-NeXT: 1 x 2, 2 x 1 and 1 x 1
    tiles; OneVision: a 4:3 image whose tile grid is cropped back, a square one, a tall one): the high-res grid has
    the unpadded shape the newlines show, a different one per image. With ``anyres_max_1`` OneVision shrinks grids
    larger than one tile (bilinear), as the model does."""
    case = build_tiny(name, num_layers=2, **overrides)
    inputs = case.inputs([1, 1, 1], text_len=[4, 2, 3])
    places = hand_places(case.model, inputs)
    check_grid(family_grid(case.model, inputs), places)
    shapes = {(p[3], p[4]) for row in places for p in row if p is not None and p[0][1] == "patches"}
    assert len(shapes) == 3, shapes


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
@torch.no_grad()
def test_anyres_grid_in_generate_reads_the_encoded_media(name):
    """generate encodes the media before the prefill and passes the core ``mm_encoder_outputs`` (no pixels, no
    image_sizes): the grid from what the core receives there is the same."""
    case = build_tiny(name, num_layers=2)
    inputs = case.inputs(**BATCHES[name])
    calls = []
    core = case.model.model
    hook = core.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        case.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    args, kwargs = calls[0]
    family = family_for(case.model)
    grid_inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None)}
    grid_inputs.update({n: kwargs.get(n) for n in family.grid_inputs})
    media = family.media_mask(case.model.config, grid_inputs["input_ids"])
    grid = family.visual_grid(case.model.config, media, grid_inputs)
    assert check_grid(grid, hand_places(case.model, inputs)) == int(media.sum())


def test_grid_of_a_prompt_without_media_is_empty():
    for name in ("llava_next", "llava_onevision", "internvl", "idefics3", "gemma3"):
        model = build_tiny(name, num_layers=2).model
        ids = torch.tensor([[5, 6, 7]])
        grid = family_for(model).visual_grid(model.config, torch.zeros_like(ids, dtype=torch.bool), {"input_ids": ids})
        assert grid.frame.tolist() == [[-1, -1, -1]], name
