"""Token layouts: which original positions a batch still holds after compaction events.

Every method in vtexit is a *token schedule*: at some layer boundaries each row keeps a subset of the positions
it still has. A :class:`Layout` records the result. Rows keep different numbers of positions, so kept positions
are right-aligned (left-padded) in a ``(batch, length)`` index with a validity mask. Right alignment keeps the last
real token of every row in the last column, which is where ``generate`` reads the next-token logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Layout:
    """Original positions held by each row, right-aligned; ``valid`` is False on pad slots."""

    index: torch.Tensor  # (batch, length) long: original sequence position of each slot
    valid: torch.Tensor  # (batch, length) bool
    # Known on the host: False only when every slot is valid (then masks need no padding and SDPA may run causal).
    padded: bool = True

    @classmethod
    def full(
        cls,
        attention_mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
        index: torch.Tensor | None = None,
    ) -> Layout:
        """The layout before any event: every position, with the caller's padding as invalid slots (``padded`` is
        assumed when a mask is given: reading it would cost a host sync, and only compacted layouts use the flag).

        ``index``: a (batch, length) ``arange`` to reuse (an engine keeps the last one: two kernels fewer per call)."""
        if index is None:
            index = torch.arange(length, device=device).expand(batch, length)
        if attention_mask is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape[1] != length:  # a mask longer than the prompt (past tokens): its tail
                attention_mask = attention_mask[:, -length:]
            valid = attention_mask.to(device=device, dtype=torch.bool)
        return cls(index=index, valid=valid, padded=attention_mask is not None)

    @property
    def length(self) -> int:
        return self.index.shape[1]

    @cached_property
    def last_slot(self) -> torch.Tensor:
        """(batch, length) bool, True at each row's last valid slot: the prompt token that predicts the next one.
        Computed once per layout (an event's checks and its selection share it)."""
        slots = torch.arange(self.length, device=self.valid.device)
        last = (slots * self.valid).argmax(dim=1, keepdim=True)
        return slots.unsqueeze(0) == last

    def select(self, keep: torch.Tensor, check: torch.Tensor | None = None) -> tuple[Layout, torch.Tensor, bool]:
        """Keep the slots where ``keep`` is True (pad slots are always dropped).

        The last valid slot of every row is always kept, whatever ``keep`` says: its output is the next-token
        prediction. Returns the new layout, for each new slot the slot of ``self`` it comes from (to gather hidden
        states), and the value of ``check`` (a 0-dim bool the caller wants on the host; False when None), read in
        the same host sync as the new length.
        """
        if keep.shape != self.valid.shape:
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected {tuple(self.valid.shape)}")
        keep = (keep.to(torch.bool) | self.last_slot) & self.valid
        counts = keep.sum(dim=1)
        # The one host read of an event: the longest row sets the new length; equal rows need no pad slots.
        fewest, most = torch.aminmax(counts)
        code = most * (self.length + 1) + fewest
        checked = False
        if check is None:
            code = int(code)
        else:  # the check rides in the lowest bit
            code = int(code * 2 + check)
            checked, code = bool(code & 1), code >> 1
        longest, shortest = divmod(code, self.length + 1)
        new_length = max(longest, 1)
        # A stable sort of the 0/1 keep flags puts dropped slots first and kept slots last, each in original order.
        order = torch.sort(keep, dim=1, stable=True).indices
        source = order[:, self.length - new_length :]
        slots = torch.arange(new_length, device=keep.device)
        valid = slots.unsqueeze(0) >= (new_length - counts).unsqueeze(1)
        return Layout(index=self.index.gather(1, source), valid=valid, padded=shortest != longest), source, checked


def gather_sequence(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``index`` (batch, new_length) along ``seq_dim``; the batch dim is the one just before it.

    Handles the shapes transformers passes to decoder layers: hidden states ``(B, L, D)``, rotary cos/sin
    ``(B, L, D)`` or ``(3, B, L, D)`` for M-RoPE, position ids ``(B, L)`` or ``(3, B, L)``, with a batch dim of 1
    broadcast over the batch.
    """
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
        seq_dim = 1
    seq_dim %= tensor.ndim
    batch_dim = seq_dim - 1
    view = [1] * tensor.ndim
    view[batch_dim], view[seq_dim] = index.shape
    # Broadcasts the index over the other dims, and a batch dim of 1 over the index's batch.
    return torch.take_along_dim(tensor, index.view(view), dim=seq_dim)
