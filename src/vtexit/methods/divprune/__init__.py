"""DivPrune (CVPR 2025): keep the most diverse visual tokens before the language model."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.divprune.config import DivPruneConfig
from vtexit.methods.divprune.policy import DivPrunePolicy
from vtexit.methods.divprune.selection import cosine_distances, max_min_diverse
from vtexit.methods.patch import apply


def divprune(model: nn.Module, *, keep: float, family: FamilySpec | None = None) -> PatchHandle:
    """Each row's language model sees its text and the most diverse fraction ``keep`` of its visual tokens (greedy
    max-min cosine distance over the projected features), at the positions of the shorter prompt (1D rotary) or their
    own (t, h, w) positions (multimodal RoPE). Returns a handle.

    The same as ``vtexit.apply(model, DivPruneConfig(keep=...))``."""
    return apply(model, DivPruneConfig(keep=keep), family=family)


__all__ = ["DivPruneConfig", "DivPrunePolicy", "cosine_distances", "divprune", "max_min_diverse"]
