"""The random baseline's settings: the layer, the kept fraction and the seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_int
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep
from vtexit.methods.random_drop.policy import RandomDropPolicy
from vtexit.methods.vtw.config import check_layer_index


@dataclass(frozen=True)
class RandomDropConfig(MethodConfig):
    """Before decoder layer ``layer`` keep a seeded uniform random fraction ``keep`` of each row's visual tokens."""

    method: ClassVar[str] = "random_drop"
    layer: int
    keep: float
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", check_layer_index("layer", self.layer))
        object.__setattr__(self, "keep", check_keep(self.keep))
        object.__setattr__(self, "seed", check_int("seed", self.seed, low=0, high=2**40 - 1, bounds="in [0, 2**40)"))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        return RandomDropPolicy(check_drop_layer(model, self.layer, family), self.keep, self.seed)
