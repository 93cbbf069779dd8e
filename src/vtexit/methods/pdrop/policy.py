"""PyramidDrop (Xing et al., arXiv 2410.17247): FastV-like stages at several layers.

Before each stage layer ``l`` every row keeps the share R of the visual tokens it *still holds*, ranked by the
attention its last prompt token gave them at layer ``l - 1`` (mean over heads, computed on the tokens that layer
really saw). With the default stages 8/16/24 and R = 0.5 a row holds V, V/2, V/4 and V/8 visual tokens in the four
segments. Rounding and ties: :mod:`vtexit.methods.fastv.ranking`. With ``renumber`` the kept tokens take
consecutive positions after each stage, as PyramidDrop's code does (the engine's ``renumber_positions``).
"""

from __future__ import annotations

import torch

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.fastv.ranking import keep_top, record_kept


class PyramidDropPolicy(Policy):
    """Attention-ranked partial drops before each of ``layers``."""

    def __init__(self, layers: tuple[int, ...], keep: float, renumber: bool = False):
        self.layers = tuple(layers)
        self.fraction = keep
        self.renumber_positions = renumber
        self.attention_layers = tuple(layer - 1 for layer in self.layers)
        self.event_layers = frozenset(self.layers)

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx not in self.layers:
            return None
        mask = keep_top(view, view.attention(view.layer_idx - 1), self.fraction)
        record_kept(view, mask)
        return mask
