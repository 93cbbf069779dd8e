"""DivPrune's settings: the kept fraction of each row's visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_renumbering
from vtexit.methods.divprune.policy import DivPrunePolicy
from vtexit.methods.fastv.ranking import check_keep


@dataclass(frozen=True)
class DivPruneConfig(MethodConfig):
    """Before the language model, keep the most diverse fraction ``keep`` of each row's visual tokens.

    Rounding as for FastV (round half up, at least one). Every family: the kept tokens take the shorter prompt's
    positions on 1D rotary positions and keep their (t, h, w) positions on multimodal RoPE."""

    method: ClassVar[str] = "divprune"
    keep: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", check_keep(self.keep))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        check_renumbering(self.method, model, family, before_llm=True)
        return DivPrunePolicy(self.keep)
