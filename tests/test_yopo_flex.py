"""YOPO's window as one FlexAttention call, against the window rule worked out with plain loops: the attention of
every visual query against SDPA under the hand-built dense mask, and the query-key pairs the block mask computes
against a block-by-block count of that mask. Large enough grids that most blocks are empty (several 128 x 128
blocks per row); two rows, one with two images, padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from vtexit.core.grids import square_grid
from vtexit.methods.yopo.flex_window import compiled_flex_attention, flex_window, flex_window_attention
from vtexit.methods.yopo.rows import split_rows

SIDE, WINDOW, BLOCK = 20, 5, 128
# Each row as runs: ("pad", n), ("text", n) or ("image", 1): one SIDE x SIDE image, row-major. Both rows are 809 long.
ROWS = [
    [("pad", 397), ("text", 5), ("image", 1), ("text", 7)],
    [("text", 3), ("image", 1), ("text", 2), ("image", 1), ("text", 4)],
]


def prompt():
    """(media, valid) of the rows, and per slot its (image, grid row, grid col), None at text and pad, by hand."""
    media, valid, places = [], [], []
    for runs in ROWS:
        place, image = [], 0
        for kind, count in runs:
            if kind == "image":
                place += [(image, k // SIDE, k % SIDE) for k in range(SIDE * SIDE)]
                image += 1
            else:
                place += [kind] * count
        media.append([isinstance(p, tuple) for p in place])
        valid.append([p != "pad" for p in place])
        places.append([p if isinstance(p, tuple) else None for p in place])
    return torch.tensor(media), torch.tensor(valid), places


def allowed_by_hand(valid, places) -> list[list[list[bool]]]:
    """Per row, per visual query (in order): which slots it may attend to."""
    radius = (WINDOW - 1) // 2
    out = []
    for b, place in enumerate(places):
        rows = []
        for s, here in enumerate(place):
            if here is None:
                continue
            rows.append(
                [
                    bool(valid[b, k])
                    and (
                        (place[k] is None and k < s)
                        or (
                            place[k] is not None
                            and place[k][0] == here[0]
                            and abs(place[k][1] - here[1]) <= radius
                            and abs(place[k][2] - here[2]) <= radius
                        )
                    )
                    for k in range(len(place))
                ]
            )
        out.append(rows)
    return out


@pytest.fixture(scope="module")
def window():
    media, valid, places = prompt()
    rows = split_rows(media, valid)
    index = torch.arange(media.shape[1]).expand_as(media)
    grid = square_grid(SimpleNamespace(image_seq_length=SIDE * SIDE), media & valid, {})
    return rows, flex_window(rows, grid, index, valid, WINDOW), allowed_by_hand(valid, places)


@torch.no_grad()
def test_flex_window_equals_sdpa_under_the_hand_built_mask(window):
    rows, flex, allowed = window
    batch, length = rows.media.shape
    queries = rows.visual.slots.shape[1]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 2, queries, 16, generator=generator)
    k, v = (torch.randn(batch, 2, length, 16, generator=generator) for _ in range(2))
    out = flex_window_attention(q, k, v, flex, 0.25, compiled_flex_attention(q.device))
    for b in range(batch):
        mask = torch.tensor(allowed[b])  # (this row's visual queries, length)
        n = mask.shape[0]
        expected = F.scaled_dot_product_attention(q[b : b + 1, :, :n], k[b : b + 1], v[b : b + 1], mask, scale=0.25)
        torch.testing.assert_close(out[b : b + 1, :, :n], expected, atol=1e-5, rtol=1e-4)


def test_flex_window_counts_the_pairs_of_its_non_empty_blocks(window):
    rows, flex, allowed = window
    length = rows.media.shape[1]
    queries = rows.visual.slots.shape[1]
    expected = []
    for per_query in allowed:
        mask = torch.zeros(queries, length, dtype=torch.bool)
        mask[: len(per_query)] = torch.tensor(per_query)
        pairs = 0
        for q0 in range(0, queries, BLOCK):
            for k0 in range(0, length, BLOCK):
                if mask[q0 : q0 + BLOCK, k0 : k0 + BLOCK].any():
                    pairs += min(BLOCK, queries - q0) * min(BLOCK, length - k0)
        expected.append(pairs)
    assert flex.computed_keys.tolist() == expected
    assert all(pairs < queries * length * 0.6 for pairs in expected)  # most blocks are skipped
