"""The model's own prefill mask where it is more than causal, for YOPO's split and dense attention.

Gemma3 masks a full-attention layer with OR(causal, same image block) and a sliding layer with AND(sliding window,
OR(causal, same image block)): an image's tokens attend to each other both ways, and a sliding layer keeps key slot k
for query slot q when ``k > q - sliding_window`` (one-sided, so the later tokens of the query's own image stay). YOPO's
rules are restrictions of that mask: text queries lose visual keys in pruned heads; under ``window`` a visual query
keeps, of the keys this mask allows it, the visual keys of its w x w neighbourhood on its image's grid and the text
keys. Elsewhere (no blocks, no sliding window) the mask is causal and these functions give the masks YOPO always
used. Everything here is made once per call (and per sliding window) on the device, from index tensors.
"""

from __future__ import annotations

import dataclasses

import torch

from vtexit.core.grids import VisualGrid
from vtexit.methods.yopo.dense import dense_mask
from vtexit.methods.yopo.rows import RowBlock
from vtexit.methods.yopo.window import Tiles


def _allowed(
    q_slot: torch.Tensor,
    k_slot: torch.Tensor,
    q_block: torch.Tensor | None,
    k_block: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """The model's rule for broadcastable query / key slots and their block ids (-1: not in a block)."""
    allowed = k_slot <= q_slot
    if q_block is not None:
        allowed = allowed | ((k_block == q_block) & (q_block >= 0))
    if sliding_window is not None:
        allowed = allowed & (k_slot > q_slot - sliding_window)
    return allowed


def rows_mask(
    block: RowBlock, valid: torch.Tensor, block_ids: torch.Tensor | None, sliding_window: int | None
) -> torch.Tensor:
    """(batch, 1, n, length) bool: the keys the model's mask allows a block's query rows, over the valid keys
    (``block_ids`` per slot or None, ``sliding_window`` of the layer or None). Pad entries read every key."""
    slots = torch.arange(valid.shape[1], device=valid.device).view(1, 1, -1)
    q_block = k_block = None
    if block_ids is not None:
        q_block = torch.where(block.valid, block_ids.gather(1, block.gather_index), -1).unsqueeze(-1)
        k_block = block_ids.unsqueeze(1)
    allowed = _allowed(block.slots.unsqueeze(-1), slots, q_block, k_block, sliding_window) & valid.unsqueeze(1)
    return (allowed | ~block.valid.unsqueeze(-1)).unsqueeze(1)


def dense_model_mask(
    media: torch.Tensor,
    valid: torch.Tensor,
    grid: VisualGrid | None,
    index: torch.Tensor,
    size: int | None,
    block_ids: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """(batch, 1, length, length) bool for the dense execution: the model's mask, with visual query rows restricted
    by the window of side ``size`` (if any) to their neighbourhood and the text keys. Pad queries read every key."""
    if block_ids is None and sliding_window is None:
        return dense_mask(media, valid, grid, index, size)
    batch, length = media.shape
    every = RowBlock(
        slots=torch.arange(length, device=media.device).expand(batch, length),
        valid=valid,
        gather_index=torch.arange(length, device=media.device).expand(batch, length),
    )
    allowed = rows_mask(every, valid, block_ids, sliding_window)
    if size is None:
        return allowed
    windowed = dense_mask(media, valid, grid, index, size)
    visual = (media & valid).view(batch, 1, length, 1)
    return torch.where(visual, windowed & allowed, allowed)


def restrict_tiles(
    t: Tiles, visual: RowBlock, length: int, block_ids: torch.Tensor | None, sliding_window: int | None
) -> Tiles:
    """``t`` with each tile's window mask cut to the model's mask (a sliding layer's window, the query's own block
    for later keys); the tiles and their keys are unchanged, so the computed keys too."""
    if block_ids is None and sliding_window is None:
        return t
    batch, width = visual.slots.shape
    pad = torch.full((1,), length, device=t.queries.device, dtype=visual.slots.dtype)
    q_ok = t.queries < batch * width
    q_slot = torch.cat([visual.slots.flatten(), pad])[t.queries].unsqueeze(-1)  # (tiles, Q, 1)
    k_slot = (t.keys % length).unsqueeze(1)  # (tiles, 1, K)
    q_block = k_block = None
    if block_ids is not None:
        blocks = torch.where(visual.valid, block_ids.gather(1, visual.gather_index), -1).flatten()
        q_block = torch.cat([blocks, pad.new_full((1,), -1)])[t.queries].unsqueeze(-1)
        k_block = block_ids.flatten()[t.keys].unsqueeze(1)
    model = _allowed(q_slot, k_slot, q_block, k_block, sliding_window) | ~q_ok.unsqueeze(-1)
    return dataclasses.replace(t, allowed=t.allowed & model.unsqueeze(1))
