"""DART's settings: the layer, the kept fraction of visual tokens and the pivot counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_int
from vtexit.methods.dart.policy import DARTPolicy
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep
from vtexit.methods.vtw.config import check_layer_index

MAX_PIVOTS = 2**31 - 1  # more than any prompt holds: each row's pivots are clipped to its tokens anyway


@dataclass(frozen=True)
class DARTConfig(MethodConfig):
    """Before decoder layer ``layer`` (DART's K = 2) keep about ``keep`` of each row's visual tokens: the least
    duplicated with ``pivots_visual`` + ``pivots_text`` pivot tokens (4 + 4 in DART's released scripts)."""

    method: ClassVar[str] = "dart"
    layer: int = 2
    keep: float = 0.25
    pivots_visual: int = 4
    pivots_text: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", check_layer_index("layer", self.layer))
        object.__setattr__(self, "keep", check_keep(self.keep))
        for name in ("pivots_visual", "pivots_text"):
            value = check_int(name, getattr(self, name), low=0, high=MAX_PIVOTS, bounds="in [0, 2**31)")
            object.__setattr__(self, name, value)
        if self.pivots_visual + self.pivots_text == 0:
            raise ValueError("pivots_visual + pivots_text must be at least 1")

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        layer = check_drop_layer(model, self.layer, family)
        norm = family.resolve(model).norm
        return DARTPolicy(layer, self.keep, self.pivots_visual, self.pivots_text, norm)
