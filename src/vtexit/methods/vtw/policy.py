"""VTW, Visual Tokens Withdrawal (Lin et al., arXiv 2405.05803).

Layers ``0..K-1`` see the full sequence; from layer ``K`` on, every visual token is withdrawn and only the text
tokens (with their original positions) go on. The paper picks K on a calibration set as the first layer where
KL(full model || withdrawn model) falls below a threshold, see :mod:`vtexit.methods.vtw.calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtexit.core.engine import PrefillView, ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.core.handle import PatchHandle


@dataclass(frozen=True)
class WithdrawPolicy:
    """Drop every media slot before decoder layer ``layer``."""

    layer: int

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer:
            return None
        return view.layout.valid & ~view.media


class WithdrawHandle(PatchHandle):
    """Handle of a VTW patch; ``layer`` is the withdrawal layer K."""

    def __init__(self, engine: ScheduleEngine, layer: int):
        super().__init__(engine)
        self.layer = layer

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"WithdrawHandle(layer={self.layer}, num_layers={self._engine.num_layers}, {state})"


def valid_layer_range(model: nn.Module, family: FamilySpec | None = None) -> tuple[int, int]:
    """The (min, max) withdrawal layer this model accepts; max = number of decoder layers (= no withdrawal)."""
    family = family or family_for(model)
    num_layers = len(family.resolve(model).layers)
    return max(1, family.min_layer(model.config)), num_layers


def check_layer(model: nn.Module, layer: object, family: FamilySpec | None = None) -> int:
    """Validate a withdrawal layer before anything touches the model."""
    low, high = valid_layer_range(model, family)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int in [{low}, {high}], got {layer!r}")
    if not low <= layer <= high:
        why = (
            " (layer 0 and the first layer of each attention type, and Qwen3-VL's deepstack layers, must keep the "
            "full sequence)"
            if layer < low
            else f" ({high} = number of decoder layers = no withdrawal)"
        )
        raise ValueError(f"layer must be in [{low}, {high}] for this model, got {layer}{why}")
    return layer


def withdraw(model: nn.Module, layer: int, *, family: FamilySpec | None = None) -> WithdrawHandle:
    """Withdraw all visual tokens before decoder layer ``layer`` (VTW). Returns a handle with ``remove()``.

    Works with plain ``model(...)`` and ``model.generate(...)``: batches with left padding, rows with any number
    of images (or none), the KV cache (withdrawn layers really cache fewer positions), SDPA and eager attention.
    """
    family = family or family_for(model)
    layer = check_layer(model, layer, family)
    engine = ScheduleEngine(model, WithdrawPolicy(layer), family)
    engine.attach()
    return WithdrawHandle(engine, layer)
