"""Pooling's rule as plain tensor functions, shared by the transformers policy and the vLLM plugin.

A token of a row-major grid ``dr`` rows and ``dc`` columns into its ``stride`` x ``stride`` block sits ``dr * width +
dc`` positions after the block's top-left token (its *leader*). Every block becomes one token: the mean of its
tokens (summed in float32 in position order), at the leader's place. Blocks at odd edges are smaller.
"""

from __future__ import annotations

import torch


def block_leaders(
    index: torch.Tensor, row: torch.Tensor, col: torch.Tensor, width: torch.Tensor, stride: int
) -> torch.Tensor:
    """The position of each token's block leader, for tokens at positions ``index`` and grid places ``row``, ``col``
    on grids whose rows are ``width`` positions apart (all long tensors of one shape)."""
    return index - (row % stride) * width - col % stride


def block_means(hidden: torch.Tensor, bucket: torch.Tensor, blocks: int) -> torch.Tensor:
    """``hidden`` (..., dim) with every slot whose ``bucket`` (...) is >= 0 replaced by the mean of the slots of its
    bucket (ids below ``blocks``); slots with bucket -1 are kept. Sums in float32, in slot order."""
    member = bucket >= 0
    flat = hidden.reshape(-1, hidden.shape[-1])
    index = bucket.clamp_min(0).flatten()
    sums = torch.zeros(blocks, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, index, flat.float() * member.flatten().unsqueeze(1))
    sizes = torch.zeros(blocks, device=hidden.device).index_add_(0, index, member.flatten().float())
    means = (sums / sizes.clamp_min(1).unsqueeze(1)).to(hidden.dtype)[index].view_as(hidden)
    return torch.where(member.unsqueeze(-1), means, hidden)


def pooled_count(side: int, stride: int) -> int:
    """Tokens left of one ``side`` x ``side`` grid: one per block."""
    blocks = -(-side // stride)
    return blocks * blocks


def pool_square_grid(features: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """(pooled_count(side, stride), dim): one image's ``features`` (side * side, dim, row-major) pooled, the blocks
    in the order of their leaders."""
    if features.shape[0] != side * side:
        raise ValueError(
            f"pool expects {side} x {side} = {side * side} visual tokens per image, got {features.shape[0]}"
        )
    index = torch.arange(side * side, device=features.device)
    row, col = index // side, index % side
    leader = block_leaders(index, row, col, torch.full_like(index, side), stride)
    means = block_means(features, leader, side * side)
    return means[(row % stride == 0) & (col % stride == 0)]
