"""Language-model loss while tokens are withdrawn: logits cover only the kept slots, so labels follow the layout.

The output at a slot holding original position ``p`` predicts the token at ``p + 1``, whether or not that token
was kept, so its target is ``labels[p + 1]``. Pad slots, the last position and ``-100`` labels are ignored. With no
compaction this is transformers' shifted causal-LM loss (mean over counted tokens), except that transformers also
scores a left-padded row's first token as predicted from its last pad; vtexit never scores from a pad slot.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vtexit.core.layout import Layout

IGNORE_INDEX = -100


def kept_positions_loss(logits: torch.Tensor, labels: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (batch, slots, vocab) against ``labels`` (batch, prompt length)."""
    labels = labels.to(logits.device)
    if layout is None:
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(
                f"labels cover {labels.shape[1]} positions but the logits {logits.shape[1]}; "
                "pass labels aligned with input_ids"
            )
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    else:
        if logits.shape[1] != layout.length:
            raise ValueError(
                f"logits cover {logits.shape[1]} slots but the layout {layout.length}; "
                "labels need the logits of every kept slot (do not pass logits_to_keep with labels)"
            )
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)
        targets = shifted.gather(1, layout.index + 1).masked_fill(~layout.valid, IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
