"""What a DyVTE gate reads at a layer boundary: the mean hidden state of the text after the last visual token and
the hidden state of the last prompt token (the gate input of DyVTE's public code).

One function for the policy (current slots of a running prefill) and for training (a recorded full forward), so
the gates see at inference exactly the features they were trained on.
"""

from __future__ import annotations

import torch

from vtexit.core.layout import Layout


def feature_slots(media_original: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(after, last), each (batch, slots) bool: ``after`` marks the text slots after each row's last visual token,
    without the last prompt token; ``last`` marks each row's last prompt token. Rows without visual tokens count
    all their text (they never exit, so it does not matter). No host read."""
    positions = torch.arange(media_original.shape[1], device=media_original.device)
    last_media = torch.where(media_original, positions, -1).amax(dim=1, keepdim=True)
    media = media_original.gather(1, layout.index) & layout.valid
    last = layout.last_slot & layout.valid
    after = layout.valid & ~media & ~last & (layout.index > last_media)
    return after, last


def gate_features(hidden: torch.Tensor, after: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(batch, 2 * hidden size): concat(mean of ``hidden`` over the ``after`` slots (zeros if none), the hidden
    state at the ``last`` slot). Summed in float32, returned in ``hidden``'s dtype."""
    weights = after.unsqueeze(-1).to(torch.float32)
    mean = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    last_slot = last.to(torch.long).argmax(dim=1)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_slot]
    return torch.cat([mean.to(hidden.dtype), last_hidden], dim=-1)
