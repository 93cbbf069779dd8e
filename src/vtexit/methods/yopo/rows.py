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
    """Slots of one kind per batch row, left-aligned in original order; pad entries hold ``length``.

    ``run``: when every row's entries are the same run of slots ``run .. run + n - 1`` (one image at batch 1, or
    rows laid out alike), gathers and scatters become slices: no index kernels, no copies in."""

    slots: torch.Tensor  # (batch, n) long
    valid: torch.Tensor  # (batch, n) bool
    gather_index: torch.Tensor  # (batch, n) long: slots safe to gather with (pad entries read slot 0, dropped later)
    run: int | None = None

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, n, ...) rows of ``states`` (batch, length, ...)."""
        return self.positions(states, 1)

    def positions(self, tensor: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """``tensor`` at the block's slots along ``seq_dim`` (rotary cos/sin too: see ``gather_sequence``)."""
        if self.run is not None:
            return tensor.narrow(seq_dim, self.run, self.slots.shape[1])
        return gather_sequence(tensor, self.gather_index, seq_dim)

    def scatter(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out`` (batch, length + 1, dim) with ``values`` (batch, n, dim) written at the block's slots (pad entries
        land in the dummy last column)."""
        if self.run is not None:
            out.narrow(1, self.run, values.shape[1]).copy_(values)
            return out
        index = self.slots.unsqueeze(-1).expand(-1, -1, out.shape[-1])
        return out.scatter(1, index, values.to(out.dtype))


@dataclass(frozen=True)
class QueryRows:
    visual: RowBlock
    text: RowBlock
    length: int
    media: torch.Tensor  # (batch, length) bool: the slots' media flags the blocks were split by
    unpadded: bool = False  # no pad slot in any row

    def assemble(self, text: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """(batch, length, dim): the text block's rows ``text`` (batch, n_text, dim) and the visual block's ``visual``
        (None: zeros) back at their slots. Rows without padding around one visual run are one concatenation: the
        text block is then the slots before the run and those after it."""
        run = self.visual.run
        if run is not None and self.unpadded:
            if visual is None:
                visual = text.new_zeros(text.shape[0], self.visual.slots.shape[1], text.shape[-1])
            return torch.cat([text[:, :run], visual.to(text.dtype), text[:, run:]], dim=1)
        out = text.new_zeros(text.shape[0], self.length + 1, text.shape[-1])
        out = self.text.scatter(out, text)
        if visual is not None:
            out = self.visual.scatter(out, visual)
        return out[:, : self.length]


def call_rows(engine) -> QueryRows:
    """The row blocks of the prefill running in this thread, split once per call (every layer reuses them)."""
    return engine.call_memo("yopo rows", lambda: split_rows(engine.current_media(), engine.current_layout().valid))


def split_rows(media: torch.Tensor, valid: torch.Tensor) -> QueryRows:
    """Visual (``media``) and text (valid, not media) slots of each row as padded blocks."""
    text = valid & ~media
    visual_count, text_count = media.sum(1), text.sum(1)
    first = media.long().argmax(1)
    slots = torch.arange(media.shape[1], device=media.device)
    in_run = (slots >= first.unsqueeze(1)) & (slots < (first + visual_count).unsqueeze(1))
    # One run at the same slots in every row: the rows' media flags equal one row's run.
    same_run = (media == in_run).all() & (first == first[0]).all() & (visual_count == visual_count[0]).all()
    read = torch.stack([visual_count.max(), text_count.max(), same_run.long(), first[0], valid.all().long()])
    width_visual, width_text, is_run, start, unpadded = (int(n) for n in read.tolist())
    length = media.shape[1]
    visual = _block(media, width_visual, length, start if is_run and width_visual else None)
    return QueryRows(visual, _block(text, width_text, length), length, media, bool(unpadded))


def _block(selected: torch.Tensor, width: int, length: int, run: int | None = None) -> RowBlock:
    # A stable sort of the negated flags puts the selected slots first, in their original order.
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=selected.device).unsqueeze(0) < selected.sum(1, keepdim=True)
    slots, index = order.masked_fill(~valid, length), order.masked_fill(~valid, 0)
    return RowBlock(slots=slots, valid=valid, gather_index=index, run=run)
