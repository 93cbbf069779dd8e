"""DART: keep the visual tokens least duplicated with a few pivots, at an early layer, without attention maps."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.dart.config import DARTConfig
from vtexit.methods.dart.policy import DARTPolicy
from vtexit.methods.patch import apply


def dart(model: nn.Module, *, layer: int = 2, keep: float = 0.25, family: FamilySpec | None = None) -> PatchHandle:
    """Before decoder layer ``layer`` each row keeps about ``keep`` of its visual tokens, the least duplicated with
    its pivot tokens (see :class:`DARTConfig`). The same as ``vtexit.apply(model, DARTConfig(layer=..., keep=...))``."""
    return apply(model, DARTConfig(layer=layer, keep=keep), family=family)


__all__ = ["DARTConfig", "DARTPolicy", "dart"]
