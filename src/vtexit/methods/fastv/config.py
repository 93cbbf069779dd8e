"""FastV's settings: the layer K before which tokens leave and the fraction R of visual tokens each row keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig
from vtexit.methods.fastv.policy import FastVPolicy
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep
from vtexit.methods.vtw.config import check_layer_index


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    """Before decoder layer ``layer`` (K) keep the fraction ``keep`` (R, in (0, 1]) of each row's visual tokens,
    those its last prompt token attends to most at layer K - 1."""

    method: ClassVar[str] = "fastv"
    layer: int
    keep: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", check_layer_index("layer", self.layer))
        object.__setattr__(self, "keep", check_keep(self.keep))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        return FastVPolicy(check_drop_layer(model, self.layer, family), self.keep)
