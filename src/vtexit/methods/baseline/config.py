"""The baseline's config: the unpatched computation, with cost records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig


@dataclass(frozen=True)
class BaselineConfig(MethodConfig):
    """No token leaves; the outputs equal the unpatched model's bit for bit."""

    method: ClassVar[str] = "none"

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        policy = Policy()
        policy.event_layers = frozenset()  # never drops: no layer needs a hook
        return policy
