"""Visual-grid pooling before the language model: the plain downsampling baseline."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.patch import apply
from vtexit.methods.pool.config import PoolConfig
from vtexit.methods.pool.policy import PoolPolicy


def pool(model: nn.Module, *, stride: int = 2, family: FamilySpec | None = None) -> PatchHandle:
    """Each image's ``stride`` x ``stride`` blocks of visual tokens enter the language model as one token, their
    mean, at the block's first position (renumbered on 1D rotary positions). The same as
    ``vtexit.apply(model, PoolConfig(stride=...))``."""
    return apply(model, PoolConfig(stride=stride), family=family)


__all__ = ["PoolConfig", "PoolPolicy", "pool"]
