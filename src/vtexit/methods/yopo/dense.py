"""YOPO's rules as masks over the full rows, for the dense execution (see :mod:`vtexit.methods.yopo.execution`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtexit.core.grids import VisualGrid


def dense_mask(
    media: torch.Tensor, valid: torch.Tensor, grid: VisualGrid | None, index: torch.Tensor, size: int | None
) -> torch.Tensor:
    """(batch, 1, length, length) bool: which keys each query slot reads. Text queries: the valid keys up to their own
    slot. Visual queries: the same, or under a window of side ``size``: every earlier text key and the visual keys of
    their w x w neighbourhood on their own frame (``grid`` per original position, ``index`` slots -> positions). Pad
    queries read every valid key (their results are dropped)."""
    length = media.shape[1]
    slots = torch.arange(length, device=media.device)
    allowed = (slots.view(1, 1, -1) <= slots.view(1, -1, 1)) & valid.unsqueeze(1)
    if size is not None:
        radius = (size - 1) // 2
        frame, row, col = (g.gather(1, index) for g in (grid.frame, grid.row, grid.col))
        visual = media & valid
        frame = torch.where(visual, frame, -1)
        near = (frame.unsqueeze(2) == frame.unsqueeze(1)) & visual.unsqueeze(1)
        near &= (row.unsqueeze(2) - row.unsqueeze(1)).abs() <= radius
        near &= (col.unsqueeze(2) - col.unsqueeze(1)).abs() <= radius
        earlier_text = (slots.view(1, 1, -1) < slots.view(1, -1, 1)) & (valid & ~media).unsqueeze(1)
        allowed = torch.where(visual.unsqueeze(2), near | earlier_text, allowed)
    allowed |= ~valid.unsqueeze(2) & valid.unsqueeze(1)
    return allowed.unsqueeze(1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (bool) as the additive mask SDPA makes of a boolean one (0 where allowed, -inf elsewhere; the same
    result to the bit), made once per call rather than inside every layer's SDPA call (two kernels each)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass(frozen=True)
class DenseHeadMasks:
    """What a dense layer with heads pruned for visual tokens chooses between, per head (made once per call)."""

    allowed: torch.Tensor  # (batch, 1, L, L) additive: an active head's mask
    text_keys: torch.Tensor  # (batch, 1, L, L) additive: a pruned head's, no visual key (a row left with none: all)
    text_rows: torch.Tensor  # (batch, 1, L, 1): a pruned head's output scale: 0 at visual query rows, else 1

    @classmethod
    def of(cls, allowed: torch.Tensor, media: torch.Tensor, dtype: torch.dtype) -> DenseHeadMasks:
        """From the bool mask ``allowed``, for queries of ``dtype``."""
        batch, length = media.shape
        text_rows = (~media).view(batch, 1, length, 1).to(dtype)
        text_keys = without_visual_keys(allowed, media)
        return cls(additive_mask(allowed, dtype), additive_mask(text_keys, dtype), text_rows)


def without_visual_keys(allowed: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """``allowed`` (batch, 1, queries, length) with the visual keys (``media`` (batch, length)) taken out: a pruned
    head's mask for text queries (``pruned_text="renormalise"``). A row left with no key reads every key (only pad
    rows and visual rows can be, and their results are dropped or zeroed)."""
    kept = allowed & ~media.view(media.shape[0], 1, 1, media.shape[1])
    return kept | ~kept.any(-1, keepdim=True)
