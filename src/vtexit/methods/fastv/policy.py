"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764): the schedule.

Before decoder layer K each row keeps the share R of its visual tokens that its last prompt token attended to most
at layer K - 1 (mean over heads); the others leave every later layer. The scores come from the engine contract
(``attention_layers``): recomputed from layer K - 1's q/k under SDPA, so no eager attention, no
``output_attentions`` and no second forward are needed, and every row ranks its own tokens (any batch size).
Rounding and ties: :mod:`vtexit.methods.fastv.ranking`.
"""

from __future__ import annotations

import torch

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.fastv.ranking import keep_top, record_kept


class FastVPolicy(Policy):
    """One attention-ranked partial drop before ``layer``."""

    def __init__(self, layer: int, keep: float):
        self.layer = layer
        self.fraction = keep
        self.attention_layers = (layer - 1,)
        self.event_layers = frozenset({layer})

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer:
            return None
        mask = keep_top(view, view.attention(self.layer - 1), self.fraction)
        record_kept(view, mask)
        return mask
