"""VTW's setting: the withdrawal layer K, and which K a model accepts."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec, family_for
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_int, is_bool, shown
from vtexit.methods.vtw.policy import WithdrawHandle, WithdrawPolicy


def valid_layer_range(model: nn.Module, family: FamilySpec | None = None) -> tuple[int, int]:
    """The (min, max) withdrawal layer this model accepts; max = number of decoder layers (= no withdrawal)."""
    family = family or family_for(model)
    num_layers = len(family.resolve(model).layers)
    return max(1, family.min_layer(model.config)), num_layers


def check_layer(model: nn.Module, layer: object, family: FamilySpec | None = None, name: str = "layer") -> int:
    """Validate a withdrawal layer before anything touches the model (``name``: the setting, for the error)."""
    low, high = valid_layer_range(model, family)
    if is_bool(layer) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {shown(layer)}")
    layer = int(layer)
    if not low <= layer <= high:
        why = (
            " (layer 0 and the first layer of each attention type, and Qwen3-VL's deepstack layers, must keep the "
            "full sequence)"
            if layer < low
            else f" ({high} = number of decoder layers = no withdrawal)"
        )
        raise ValueError(f"{name} must be in [{low}, {high}] for this model, got {shown(layer)}{why}")
    return layer


def check_layer_index(name: str, layer: object, optional: bool = False) -> int | None:
    """A decoder layer setting as a plain int >= 0 (ValueError naming it); the model bounds it when applied."""
    return check_int(name, layer, low=0, what="a decoder layer; the model bounds it when applied", optional=optional)


@dataclass(frozen=True)
class VTWConfig(MethodConfig):
    """Withdraw every visual token before decoder layer ``layer`` (K)."""

    method: ClassVar[str] = "vtw"
    handle_class: ClassVar[type] = WithdrawHandle
    layer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", check_layer_index("layer", self.layer))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        return WithdrawPolicy(check_layer(model, self.layer, family))
