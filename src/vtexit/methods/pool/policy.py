"""Pooling the visual grid before the language model: each image's s x s blocks of visual tokens become one token,
their mean, at the block's first (top-left) position; positions are renumbered as for a shorter prompt. A plain
baseline that recent benchmarks (UniPruneBench, VTC-Bench) find hard to beat."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.pool.blocks import block_leaders, block_means

_BLOCKS = "pool blocks"  # view.state key: keep() hands merge() each slot's block


class PoolPolicy(Policy):
    """Average ``stride`` x ``stride`` blocks of each image's visual grid (blocks at odd edges are smaller)."""

    event_layers = frozenset({0})
    renumber_positions = True

    def __init__(self, stride: int, family: FamilySpec, config: PretrainedConfig):
        if family.visual_grid is None:
            raise ValueError(f"pool is not supported for {family.name}: the family does not describe its visual grid")
        self.stride, self.family, self.config = stride, family, config

    def _blocks(self, view: PrefillView) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: the id of its block, unique in the batch (-1 at text slots), and whether it leads its block. A
        block's id is its top-left token's original position (tokens of a frame are row-major, so the token ``dr``
        rows and ``dc`` columns back sits ``dr * row_step + dc`` positions back), offset by row. Blocks never cross
        a frame's border (an image, a tile, a video frame, an anyres newline column)."""
        media, index = view.media, view.layout.index
        grid = self.family.visual_grid(self.config, view.media_original, view.grid_inputs)
        row, col, width = (g.gather(1, index) for g in (grid.row, grid.col, grid.row_step))
        s = self.stride
        leader = block_leaders(index, row, col, width, s)
        batch, prompt = view.media_original.shape
        offset = torch.arange(batch, device=media.device).unsqueeze(1) * prompt
        first = media & (row % s == 0) & (col % s == 0)
        return torch.where(media, leader + offset, -1), first

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        bucket, first = self._blocks(view)
        view.state[_BLOCKS] = bucket  # for merge(), which the engine calls next with the same view
        return view.text | first

    def merge(self, view: PrefillView, keep: torch.Tensor) -> torch.Tensor | None:
        bucket = view.state.pop(_BLOCKS)
        return block_means(view.hidden_states, bucket, view.media_original.numel())
