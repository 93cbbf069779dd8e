"""Which slots of a prefill are visual and text query rows, and each visual query's window, as index tensors.

YOPO computes visual and text rows separately (that is where its savings come from), so each layer gathers the
rows of one kind into a (batch, n) block: rows differ in how many visual tokens they hold, so blocks are padded and
pad entries point at a dummy column ``length`` that results are scattered into and then dropped. These indices are
the same for every layer of a prefill; they are built once per call (one host read: the block widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtexit.core.grids import VisualGrid
from vtexit.core.layout import gather_sequence


@dataclass(frozen=True)
class RowBlock:
    """Slots of one kind per batch row, left-aligned in original order; pad entries hold ``length``."""

    slots: torch.Tensor  # (batch, n) long
    valid: torch.Tensor  # (batch, n) bool

    @property
    def gather_index(self) -> torch.Tensor:
        """Slots safe to gather with (pad entries read slot 0; their results are dropped)."""
        return self.slots.masked_fill(~self.valid, 0)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, n, ...) rows of ``states`` (batch, length, ...)."""
        return gather_sequence(states, self.gather_index, 1)

    def scatter(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out`` (batch, length + 1, dim) with ``values`` (batch, n, dim) written at the block's slots (pad entries
        land in the dummy last column)."""
        index = self.slots.unsqueeze(-1).expand(-1, -1, out.shape[-1])
        return out.scatter(1, index, values.to(out.dtype))


@dataclass(frozen=True)
class QueryRows:
    visual: RowBlock
    text: RowBlock
    length: int


def split_rows(media: torch.Tensor, valid: torch.Tensor) -> QueryRows:
    """Visual (``media``) and text (valid, not media) slots of each row as padded blocks."""
    text = valid & ~media
    width_visual, width_text = (int(n) for n in torch.stack([media.sum(1).max(), text.sum(1).max()]).tolist())
    length = media.shape[1]
    return QueryRows(_block(media, width_visual, length), _block(text, width_text, length), length)


def _block(selected: torch.Tensor, width: int, length: int) -> RowBlock:
    # A stable sort of the negated flags puts the selected slots first, in their original order.
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=selected.device).unsqueeze(0) < selected.sum(1, keepdim=True)
    return RowBlock(slots=order.masked_fill(~valid, length), valid=valid)


@dataclass(frozen=True)
class Windows:
    """Keys of each visual query under neighbour-aware attention."""

    neighbours: torch.Tensor  # (batch, visual, w*w) long: slots of the w x w neighbours (0 where none)
    neighbour_ok: torch.Tensor  # (batch, visual, w*w) bool: the neighbour exists on the grid
    earlier_text: torch.Tensor  # (batch, visual, text) bool: text key before the visual query
    keys_per_row: torch.Tensor  # (batch,) keys all visual queries of a row attend to (for cost records)


def windows(rows: QueryRows, grid: VisualGrid, index: torch.Tensor, size: int) -> Windows:
    """Neighbourhoods of ``size`` x ``size`` tokens on each visual query's own grid (before or after it), plus every
    earlier text key. ``grid`` is per original position; ``index`` maps the current slots to those positions."""
    visual, text = rows.visual, rows.text
    slot = visual.gather_index
    position = index.gather(1, slot)

    def at(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, position).unsqueeze(-1)

    radius = (size - 1) // 2
    offsets = torch.arange(-radius, radius + 1, device=slot.device)
    d_row = offsets.repeat_interleave(size).view(1, 1, -1)
    d_col = offsets.repeat(size).view(1, 1, -1)
    row, col = at(grid.row) + d_row, at(grid.col) + d_col
    on_grid = (row >= 0) & (row < at(grid.height)) & (col >= 0) & (col < at(grid.width))
    neighbour_ok = on_grid & visual.valid.unsqueeze(-1)
    # A frame's tokens are consecutive and row-major, so the neighbour (dr, dc) is dr * width + dc slots away.
    neighbours = (slot.unsqueeze(-1) + d_row * at(grid.width) + d_col).masked_fill(~neighbour_ok, 0)
    earlier = (text.slots.unsqueeze(1) < slot.unsqueeze(-1)) & text.valid.unsqueeze(1) & visual.valid.unsqueeze(-1)
    keys = neighbour_ok.sum((1, 2)) + earlier.sum((1, 2))
    return Windows(neighbours, neighbour_ok, earlier, keys)
