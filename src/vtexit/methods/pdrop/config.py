"""PyramidDrop's settings: the stage layers, the fraction each stage keeps, and whether positions are renumbered."""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_bool, is_bool, renumbering_refusal, shown
from vtexit.methods.fastv.ranking import check_drop_layer, check_keep, drop_layer_range
from vtexit.methods.pdrop.policy import PyramidDropPolicy

DEFAULT_LAYERS = (8, 16, 24)  # PyramidDrop's stages for 32-layer LLaVA-1.5


def parse_layers(value: object) -> tuple[int, ...]:
    """Stage layers from a tuple/list of ints, or from text such as ``"8,16,24"`` / ``"8 16 24"`` / ``"8/16/24"``."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;/]+", value.strip()) if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"layers must be increasing ints such as 8,16,24, got {shown(value)}") from None
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(
            f"layers must be a non-empty sequence of increasing ints such as (8, 16, 24), got {shown(value)}"
        )
    if any(is_bool(v) or not isinstance(v, numbers.Integral) or v < 0 for v in value):
        raise ValueError(f"layers must be ints >= 0, got {shown(value)}")
    layers = tuple(int(v) for v in value)
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"layers must be strictly increasing, got {shown(layers)}")
    return layers


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    """Before each layer of ``layers`` keep the fraction ``keep`` of the visual tokens each row still holds, ranked
    by the last prompt token's attention at the layer before; ``renumber`` gives the kept tokens consecutive
    positions (1D rotary families only: refused for the multimodal-RoPE families, Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

    method: ClassVar[str] = "pdrop"
    layers: tuple[int, ...] = DEFAULT_LAYERS
    keep: float = 0.5
    renumber: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "keep", check_keep(self.keep))
        object.__setattr__(self, "renumber", check_bool("renumber", self.renumber))

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PDropConfig:
        settings = dict(settings)
        if "layers" in settings:  # text such as "8,16,24" (CLI, plugin arguments) or a JSON list
            settings["layers"] = parse_layers(settings["layers"])
        return super().from_settings(settings)

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        low, high = drop_layer_range(model, family)
        if self.layers == DEFAULT_LAYERS and not all(low <= layer <= high for layer in self.layers):
            raise ValueError(
                f"pdrop's default layers {DEFAULT_LAYERS} do not fit this {high + 1}-layer model (they are "
                f"PyramidDrop's stages for 32-layer LLaVA-1.5); set layers=... (increasing ints in [{low}, {high}], "
                f"e.g. layers={suggested_layers(low, high)})"
            )
        for layer in self.layers:
            check_drop_layer(model, layer, family, name="layers")
        if self.renumber:
            why = renumbering_refusal(model, family, before_llm=False)
            if why is not None:
                raise ValueError(
                    f"pdrop's renumber=True is not supported for {family.name} yet: {why}; use renumber=False"
                )
        return PyramidDropPolicy(self.layers, self.keep, self.renumber)


def suggested_layers(low: int, high: int) -> tuple[int, ...]:
    """Stages at about a quarter, a half and three quarters of a model's drop layers [low, high] (PyramidDrop's
    8/16/24 of 32), for the message that refuses the default stages."""
    n = high + 1
    return tuple(sorted({min(high, max(low, (n * k + 2) // 4)) for k in (1, 2, 3)}))
