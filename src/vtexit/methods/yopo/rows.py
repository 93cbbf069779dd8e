"""Which slots of a prefill are visual and text query rows, as index tensors.

YOPO computes visual and text rows separately (that is where its savings come from), so each layer gathers the
rows of one kind into a (batch, n) block: rows differ in how many visual tokens they hold, so blocks are padded and
pad entries point at a dummy column ``length`` that results are scattered into and then dropped. These indices are
the same for every layer of a prefill; they are built once per call (one host read: the block widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    media: torch.Tensor  # (batch, length) bool: the slots' media flags the blocks were split by


def call_rows(engine) -> QueryRows:
    """The row blocks of the prefill running in this thread, split once per call (every layer reuses them)."""
    return engine.call_memo("yopo rows", lambda: split_rows(engine.current_media(), engine.current_layout().valid))


def split_rows(media: torch.Tensor, valid: torch.Tensor) -> QueryRows:
    """Visual (``media``) and text (valid, not media) slots of each row as padded blocks."""
    text = valid & ~media
    width_visual, width_text = (int(n) for n in torch.stack([media.sum(1).max(), text.sum(1).max()]).tolist())
    length = media.shape[1]
    return QueryRows(_block(media, width_visual, length), _block(text, width_text, length), length, media)


def _block(selected: torch.Tensor, width: int, length: int) -> RowBlock:
    # A stable sort of the negated flags puts the selected slots first, in their original order.
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=selected.device).unsqueeze(0) < selected.sum(1, keepdim=True)
    return RowBlock(slots=order.masked_fill(~valid, length), valid=valid)
