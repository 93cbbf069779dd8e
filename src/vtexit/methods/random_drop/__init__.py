"""A seeded uniform random drop of visual tokens at one layer: the baseline every ranking should beat."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.patch import apply
from vtexit.methods.random_drop.config import RandomDropConfig
from vtexit.methods.random_drop.policy import RandomDropPolicy, uniform_values


def random_drop(
    model: nn.Module, *, layer: int, keep: float, seed: int = 0, family: FamilySpec | None = None
) -> PatchHandle:
    """Before decoder layer ``layer`` each row keeps a uniformly random fraction ``keep`` of its visual tokens,
    chosen by ``seed`` (deterministic: the same seed keeps the same tokens of a row in any batch). Returns a handle.

    The same as ``vtexit.apply(model, RandomDropConfig(layer=..., keep=..., seed=...))``.
    """
    return apply(model, RandomDropConfig(layer=layer, keep=keep, seed=seed), family=family)


__all__ = ["RandomDropConfig", "RandomDropPolicy", "random_drop", "uniform_values"]
