"""DART's settings: the layer, the kept fraction of visual tokens and the pivot counts."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig
from vtexit.methods.dart.policy import DARTPolicy
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep


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
        object.__setattr__(self, "keep", check_keep(self.keep))
        for name in ("pivots_visual", "pivots_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.pivots_visual + self.pivots_text == 0:
            raise ValueError("pivots_visual + pivots_text must be at least 1")

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        layer = check_drop_layer(model, self.layer, family)
        norm = family.resolve(model).norm
        return DARTPolicy(layer, self.keep, int(self.pivots_visual), int(self.pivots_text), norm)
