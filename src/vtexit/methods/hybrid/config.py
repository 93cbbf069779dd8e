"""A hybrid's settings: the pre-LLM step and the in-LLM step, each a method config as a dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, config_of, shown
from vtexit.methods.dart.config import DARTConfig
from vtexit.methods.divprune.config import DivPruneConfig
from vtexit.methods.dyvte.config import DyVTEConfig
from vtexit.methods.fastv.config import FastVConfig
from vtexit.methods.hybrid.policy import HybridPolicy
from vtexit.methods.pdrop.config import PDropConfig
from vtexit.methods.pool.config import PoolConfig
from vtexit.methods.random_drop.config import RandomDropConfig
from vtexit.methods.visionzip.config import VisionZipConfig
from vtexit.methods.vtw.config import VTWConfig

PRE_LLM_METHODS = ("divprune", "pool", "visionzip")
# The methods a hybrid's steps may name: a pre-LLM reduction, then an in-LLM schedule.
STEP_CONFIGS: dict[str, type[MethodConfig]] = {
    cls.method: cls
    for cls in (
        DivPruneConfig,
        PoolConfig,
        VisionZipConfig,
        VTWConfig,
        DyVTEConfig,
        FastVConfig,
        PDropConfig,
        RandomDropConfig,
        DARTConfig,
    )
}


@dataclass(frozen=True)
class HybridConfig(MethodConfig):
    """``{"method": "hybrid", "pre": {"method": "divprune", "keep": 0.25}, "then": {"method": "vtw", "layer": 8}}``:
    one patch, one ``remove()``."""

    method: ClassVar[str] = "hybrid"
    pre: dict[str, Any]
    then: dict[str, Any]

    def __post_init__(self) -> None:
        for name in ("pre", "then"):
            step = getattr(self, name)
            if not isinstance(step, Mapping) or "method" not in step:
                raise ValueError(f"{name} must be a method config as a dict with a 'method' key, got {shown(step)}")
        pre_method, then_method = self.pre["method"], self.then["method"]
        if not isinstance(pre_method, str) or pre_method not in PRE_LLM_METHODS:
            raise ValueError(f"pre must be one of {list(PRE_LLM_METHODS)} (before the LLM), got {shown(pre_method)}")
        if not isinstance(then_method, str) or then_method not in STEP_CONFIGS or then_method in PRE_LLM_METHODS:
            raise ValueError(
                f"then must be an in-LLM schedule method (vtw, dyvte, fastv, pdrop, random_drop, dart), got "
                f"{shown(then_method)}"
            )
        pre, then = self.steps()  # each step's own checks
        object.__setattr__(self, "pre", pre.to_dict())  # new dicts; settings given as text (CLI, model_args) as values
        object.__setattr__(self, "then", then.to_dict())

    def steps(self) -> tuple[MethodConfig, MethodConfig]:
        return self._step("pre"), self._step("then")

    def _step(self, name: str) -> MethodConfig:
        try:
            return config_of(STEP_CONFIGS, getattr(self, name))
        except ValueError as err:  # the step's own message, under the setting that holds it
            raise ValueError(f"{name}: {err}") from None

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        policies = []
        for name, step in zip(("pre", "then"), self.steps(), strict=True):
            try:
                policies.append(step.build_policy(model, family))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        num_layers = model.config.get_text_config().num_hidden_layers
        return HybridPolicy(*policies, num_layers)
