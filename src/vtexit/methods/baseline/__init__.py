"""The unpatched computation, tracked: no token leaves, but cost records are kept like any method's.

Reports compare every method against this, so the baseline's FLOPs come from what ran, not from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig
from vtexit.methods.registry import apply


@dataclass(frozen=True)
class BaselineConfig(MethodConfig):
    """No token leaves; the outputs equal the unpatched model's bit for bit."""

    method: ClassVar[str] = "none"

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        policy = Policy()
        policy.event_layers = frozenset()  # never drops: no layer needs a hook
        return policy


def baseline(model: nn.Module, *, family: FamilySpec | None = None) -> PatchHandle:
    """Track the unpatched computation (cost records only)."""
    return apply(model, BaselineConfig(), family=family)
