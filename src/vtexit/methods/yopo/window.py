"""Neighbour-aware visual attention as block-sparse attention over tiles of each image's grid.

A visual query attends to the visual keys of its w x w neighbourhood on its own image's grid (before or after it)
and to every earlier text key. Gathering w*w keys per query duplicates every key w*w times and runs as tiny matrix
products; instead each frame's grid is cut into tiles of up to ``TILE`` x ``TILE`` queries, and a tile attends to
its halo (the tile grown by (w-1)/2 on each side, clipped to the frame) plus the row's text keys before the frame
(text after it is no query's earlier text), with the exact window as a mask: one dense SDPA call over all tiles. Each
query computes at most (TILE + w - 1)^2 + text keys instead of every key of the prompt (for a small image, its whole
grid); the cost records count the computed keys, padding included.

The tiling is built once per prefill on the host from the grid (one device-to-host copy of the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vtexit.core.grids import VisualGrid
from vtexit.methods.yopo.rows import QueryRows

TILE = 8


@dataclass(frozen=True)
class Tiles:
    """Tiles of visual queries with their keys, indices into flattened (batch * n) tensors."""

    queries: torch.Tensor  # (tiles, TILE^2) long: index into the flattened visual block; pad entries -> batch * V
    keys: torch.Tensor  # (tiles, halo + text) long: index into the flattened (batch * length) keys
    allowed: torch.Tensor  # (tiles, 1, TILE^2, halo + text) bool
    computed_keys: torch.Tensor  # (batch,) query-key pairs computed per row (per head), for cost records


def tiles(rows: QueryRows, grid: VisualGrid, index: torch.Tensor, size: int) -> Tiles:
    """Tile every frame of every row; ``grid`` is per original position, ``index`` maps slots to positions."""
    device = index.device
    visual, text = rows.visual, rows.text
    batch, width_v = visual.slots.shape
    length = rows.length
    radius = (size - 1) // 2
    slot = visual.gather_index
    position = index.gather(1, slot)
    # The one device-to-host copy of the call: grid places and slots of the visual entries, and the text slots.
    host = torch.cat(
        [
            *(g.gather(1, position) for g in (grid.height, grid.width, grid.row_step, grid.row, grid.col)),
            slot,
            visual.valid.sum(1, keepdim=True),
            text.gather_index,
            text.valid.long(),
        ],
        dim=1,
    ).cpu()
    heights, widths, steps, slots_h = (host[:, k * width_v : (k + 1) * width_v].tolist() for k in (0, 1, 2, 5))
    counts = host[:, 6 * width_v]
    text_slots = host[:, 6 * width_v + 1 : 6 * width_v + 1 + text.slots.shape[1]]
    text_valid = host[:, 6 * width_v + 1 + text.slots.shape[1] :].bool()
    # A frame starts at its top-left token (row 0, column 0); its token (r, c) is r * step + c entries further (the
    # visual block holds every visual slot of the row, and a frame's rows are ``step`` slots apart).
    top_left = (host[:, 3 * width_v : 4 * width_v] == 0) & (host[:, 4 * width_v : 5 * width_v] == 0)
    top_left &= torch.arange(width_v) < counts.unsqueeze(1)
    frames = []  # (row, first block entry, first slot, height, width, row step, the text slots before its last query)
    for b, j in top_left.nonzero().tolist():
        h, w, step = heights[b][j], widths[b][j], steps[b][j]
        before = text_slots[b][text_valid[b] & (text_slots[b] < slots_h[b][j + (h - 1) * step + w - 1])]
        frames.append((b, j, slots_h[b][j], h, w, step, before))
    # One tile shape per call (no larger than the largest frame, so small images are one tile).
    tile_h = min(TILE, max(f[3] for f in frames))
    tile_w = min(TILE, max(f[4] for f in frames))
    q_row, q_col = torch.arange(tile_h).repeat_interleave(tile_w), torch.arange(tile_w).repeat(tile_h)
    pieces = []
    for b, j, first, h, w, step, text_keys in frames:
        for r0 in range(0, h, tile_h):
            for c0 in range(0, w, tile_w):
                qr, qc = r0 + q_row, c0 + q_col
                q_ok = (qr < h) & (qc < w)
                # The halo: the tile grown by the window radius, clipped to the frame.
                rows_k = torch.arange(max(0, r0 - radius), min(h, r0 + tile_h + radius))
                cols_k = torch.arange(max(0, c0 - radius), min(w, c0 + tile_w + radius))
                kr, kc = rows_k.repeat_interleave(len(cols_k)), cols_k.repeat(len(rows_k))
                near = ((qr.view(-1, 1) - kr.view(1, -1)).abs() <= radius) & (
                    (qc.view(-1, 1) - kc.view(1, -1)).abs() <= radius
                )
                earlier = text_keys.view(1, -1) < (first + qr * step + qc).view(-1, 1)
                queries = torch.where(q_ok, b * width_v + j + qr * step + qc, batch * width_v)
                pieces.append((b, queries, b * length + first + kr * step + kc, near, text_keys, earlier, q_ok))
    halo = max(len(p[2]) for p in pieces)
    text_width = max(len(p[4]) for p in pieces)
    q_list, k_list, a_list = [], [], []
    computed = torch.zeros(batch, dtype=torch.long)
    for b, queries, keys, near, text_keys, earlier, q_ok in pieces:
        missing, missing_text = halo - len(keys), text_width - len(text_keys)
        q_list.append(queries)
        k_list.append(torch.cat([F.pad(keys, (0, missing)), F.pad(b * length + text_keys, (0, missing_text))]))
        allowed = torch.cat([F.pad(near, (0, missing), value=False), F.pad(earlier, (0, missing_text), value=False)], 1)
        a_list.append(allowed | ~q_ok.view(-1, 1))  # pad queries read everything; their results are dropped
        computed[b] += len(queries) * (halo + text_width)
    return Tiles(
        queries=torch.stack(q_list).to(device),
        keys=torch.stack(k_list).to(device),
        allowed=torch.stack(a_list).unsqueeze(1).to(device),
        computed_keys=computed.to(device),
    )


def tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    t: Tiles,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Visual queries (batch, heads, V, dim) over their tiles' keys (keys/values: (batch, heads, length, dim));
    ``mask``: ``t.allowed`` as an additive mask made once per call (default: ``t.allowed`` itself)."""
    batch, heads, width_v, dim = query.shape
    flat_q = query.transpose(1, 2).reshape(batch * width_v, heads, dim)
    flat_q = torch.cat([flat_q, flat_q.new_zeros(1, heads, dim)])  # the pad entry
    q = flat_q[t.queries].transpose(1, 2)  # (tiles, heads, TILE^2, dim)
    k, v = _tile_keys(key, t.keys), _tile_keys(value, t.keys)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=t.allowed if mask is None else mask, scale=scale)
    placed = flat_q.new_zeros(batch * width_v + 1, heads, dim)
    placed = placed.index_copy(0, t.queries.flatten(), out.transpose(1, 2).reshape(-1, heads, dim))
    return placed[:-1].view(batch, width_v, heads, dim).transpose(1, 2)


def _tile_keys(states: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(tiles, heads, keys, dim) rows of ``states`` (batch, heads, length, dim) at the flattened ``keys``: one
    ``index_select`` along the length (at batch 1 the flattening is a view), where reshaping the whole tensor into rows
    of every head first cost a copy of it before the gather."""
    heads, dim = states.shape[1], states.shape[-1]
    by_head = states.transpose(0, 1).flatten(1, 2)  # (heads, batch * length, dim)
    return by_head.index_select(1, keys.flatten()).view(heads, *keys.shape, dim).transpose(0, 1)
