"""Pooling's setting: the block side."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig
from vtexit.methods.pool.policy import PoolPolicy


@dataclass(frozen=True)
class PoolConfig(MethodConfig):
    """Before the language model, average each image's ``stride`` x ``stride`` blocks of visual tokens into one
    token (2: a quarter of the tokens). Needs the family's visual grid and 1D rotary positions (LLaVA-1.5)."""

    method: ClassVar[str] = "pool"
    stride: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.stride, bool) or not isinstance(self.stride, numbers.Integral) or self.stride < 2:
            raise ValueError(f"stride must be an int >= 2 (the side of the pooled blocks), got {self.stride!r}")

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        return PoolPolicy(int(self.stride), family, model.config)
