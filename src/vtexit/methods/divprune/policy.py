"""DivPrune before the language model: the prompt each row's decoder layers see holds its text and its most diverse
visual tokens (see :mod:`vtexit.methods.divprune.selection`), chosen from the projected visual features (the first
decoder layer's input), with positions renumbered as if the dropped tokens had never been in the prompt."""

from __future__ import annotations

import torch

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.divprune.selection import max_min_diverse
from vtexit.methods.fastv.ranking import keep_counts, record_kept


class DivPrunePolicy(Policy):
    """Keep a fraction ``keep`` of each row's visual tokens (over all its images), before layer 0."""

    event_layers = frozenset({0})
    renumber_positions = True

    def __init__(self, keep: float):
        self.fraction = keep

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        media = view.media
        chosen = max_min_diverse(view.hidden_states, media, keep_counts(media.sum(dim=1), self.fraction))
        mask = view.text | chosen
        record_kept(view, mask)
        return mask
