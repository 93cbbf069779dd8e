"""PyramidDrop's settings: the stage layers, the fraction each stage keeps, and whether positions are renumbered."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep
from vtexit.methods.pdrop.policy import PyramidDropPolicy

DEFAULT_LAYERS = (8, 16, 24)  # PyramidDrop's stages for 32-layer LLaVA-1.5


def parse_layers(value: object) -> tuple[int, ...]:
    """Stage layers from a tuple/list of ints, or from text such as ``"8,16,24"`` / ``"8 16 24"`` / ``"8/16/24"``."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;/]+", value.strip()) if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"layers must be increasing ints such as 8,16,24, got {value!r}") from None
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"layers must be a non-empty sequence of increasing ints such as (8, 16, 24), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise ValueError(f"layers must be ints, got {value!r}")
    layers = tuple(int(v) for v in value)
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layers must be strictly increasing, got {layers}")
    return layers


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    """Before each layer of ``layers`` keep the fraction ``keep`` of the visual tokens each row still holds, ranked
    by the last prompt token's attention at the layer before; ``renumber`` gives the kept tokens consecutive
    positions (1D rotary families only: refused for M-RoPE families and Gemma3)."""

    method: ClassVar[str] = "pdrop"
    layers: tuple[int, ...] = DEFAULT_LAYERS
    keep: float = 0.5
    renumber: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "keep", check_keep(self.keep))
        if not isinstance(self.renumber, bool):
            raise ValueError(f"renumber must be True or False, got {self.renumber!r}")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PDropConfig:
        settings = dict(settings)
        if "layers" in settings:  # text such as "8,16,24" (CLI, plugin arguments) or a JSON list
            settings["layers"] = parse_layers(settings["layers"])
        return super().from_settings(settings)

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        for layer in self.layers:
            check_drop_layer(model, layer, family, name="layers")
        policy = PyramidDropPolicy(self.layers, self.keep, self.renumber)
        if self.renumber:
            engine = ScheduleEngine(model, policy, family)  # not attached: only for the engine's own check
            try:  # run here so that the error names this setting
                engine.check_policy()
            except ValueError as err:
                raise ValueError(f"renumber=True is not available for this model ({err}); use renumber=False") from None
        return policy
