"""Neighbour-aware visual attention as one FlexAttention kernel per layer.

The same rule as :mod:`vtexit.methods.yopo.window`: a visual query attends to the visual keys of its w x w
neighbourhood on its own frame's grid (before or after it) and to every earlier text key. Here the rule is a
``mask_mod`` over (visual query, prompt slot) pairs, turned once per prefill into a ``BlockMask`` on the device
(no host loop, no gathered tiles); PyTorch's FlexAttention then skips the blocks the mask leaves empty and runs the
rest as one fused kernel. On CUDA that is the kernel the window needs; compiled on the CPU it is exact too (the tiled
SDPA path stays the CPU default, where it is faster at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from vtexit.core.grids import VisualGrid
from vtexit.methods.yopo.rows import QueryRows


@dataclass(frozen=True)
class FlexWindow:
    """The block mask of one prefill's visual queries and the query-key pairs its non-empty blocks compute."""

    block_mask: BlockMask
    computed_keys: torch.Tensor  # (batch,) per head, for cost records


def flex_window(
    rows: QueryRows,
    grid: VisualGrid,
    index: torch.Tensor,
    valid: torch.Tensor,
    size: int,
    block_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> FlexWindow:
    """The window rule for the visual block of ``rows`` (queries) over every slot (keys). ``grid`` is per original
    position, ``index`` maps slots to positions, ``valid`` (batch, length) flags real slots. ``block_ids`` (per slot,
    -1 outside a block) and ``sliding_window``, where the model's mask has them (Gemma3), cut the window to that
    mask (see :mod:`vtexit.methods.yopo.model_mask`)."""
    radius = (size - 1) // 2
    visual = rows.visual
    frame, row, col = (g.gather(1, index) for g in (grid.frame, grid.row, grid.col))
    is_visual = rows.media & valid
    key_frame = torch.where(is_visual, frame, -1)  # text and pad slots are never neighbours
    key_text = valid & ~rows.media
    slot = visual.gather_index
    q_frame = torch.where(visual.valid, key_frame.gather(1, slot), -2)  # pad queries match nothing
    q_row, q_col, q_slot = row.gather(1, slot), col.gather(1, slot), slot

    q_block = None if block_ids is None else torch.where(visual.valid, block_ids.gather(1, slot), -1)

    def mask_mod(b, h, q, kv):
        near = (key_frame[b, kv] == q_frame[b, q]) & ((row[b, kv] - q_row[b, q]).abs() <= radius)
        near = near & ((col[b, kv] - q_col[b, q]).abs() <= radius)
        allowed = near | (key_text[b, kv] & (kv < q_slot[b, q]) & (q_frame[b, q] >= 0))
        if sliding_window is not None:
            allowed = allowed & (kv > q_slot[b, q] - sliding_window)
        if q_block is not None:
            same = (block_ids[b, kv] == q_block[b, q]) & (q_block[b, q] >= 0)
            allowed = allowed & ((kv <= q_slot[b, q]) | same)
        return allowed

    batch, queries = slot.shape
    length = valid.shape[1]
    block_mask = create_block_mask(mask_mod, batch, None, queries, length, device=valid.device)
    return FlexWindow(block_mask, _computed_pairs(block_mask, queries, length))


def _computed_pairs(block_mask: BlockMask, queries: int, length: int) -> torch.Tensor:
    """(batch,) query-key pairs in the blocks the kernel computes (partial and full ones), blocks clipped to the real
    sizes. The mask is the same for every head, so head 0 stands for all."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    counts, indices = block_mask.kv_num_blocks[:, 0], block_mask.kv_indices[:, 0]  # (batch, q blocks[, kv blocks])
    device = counts.device
    starts = torch.arange(indices.shape[-1], device=device) * kv_block
    block_keys = (length - starts).clamp(0, kv_block)  # keys in kv block k
    keys = _keys_in(counts, indices, block_keys)
    if block_mask.full_kv_num_blocks is not None:
        keys = keys + _keys_in(block_mask.full_kv_num_blocks[:, 0], block_mask.full_kv_indices[:, 0], block_keys)
    rows = (queries - torch.arange(counts.shape[1], device=device) * q_block).clamp(0, q_block)
    return (rows * keys).sum(dim=1)


def _keys_in(counts: torch.Tensor, indices: torch.Tensor, block_keys: torch.Tensor) -> torch.Tensor:
    """(batch, q blocks) keys of the first ``counts`` kv blocks listed in ``indices`` of each query block."""
    listed = torch.arange(indices.shape[-1], device=counts.device) < counts.unsqueeze(-1)
    return (block_keys[indices.long()] * listed).sum(dim=-1)


def flex_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: FlexWindow, scale: float, kernel
) -> torch.Tensor:
    """Visual queries (batch, heads, V, dim) over the keys/values (batch, heads, length, dim) the window allows, with
    ``kernel`` (``flex_attention``, usually compiled). Pad queries come out as zeros (their results are dropped)."""
    return kernel(query, key, value, block_mask=window.block_mask, scale=scale)


def compiled_flex_attention(device: torch.device):
    """FlexAttention compiled to its fused kernel for ``device``. On CUDA, shapes become dynamic after the first new
    prompt length (no recompilation per length); on the CPU each prompt shape compiles once (torch 2.13's CPU
    template fails to build under dynamic shapes)."""
    return torch.compile(flex_attention, dynamic=False if device.type == "cpu" else None)
