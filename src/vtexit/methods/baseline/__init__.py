"""The unpatched computation, tracked: no token leaves, but cost records are kept like any method's.

Reports compare every method against this, so the baseline's FLOPs come from what ran, not from a formula.
"""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.baseline.config import BaselineConfig
from vtexit.methods.patch import apply

__all__ = ["BaselineConfig", "baseline"]


def baseline(model: nn.Module, *, family: FamilySpec | None = None) -> PatchHandle:
    """Track the unpatched computation (cost records only)."""
    return apply(model, BaselineConfig(), family=family)
