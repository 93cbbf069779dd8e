"""VTW, Visual Tokens Withdrawal (arXiv 2405.05803): config, schedule, and KL calibration of the layer K."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.methods.patch import apply
from vtexit.methods.vtw.calibrate import DEFAULT_ETA, CalibrationResult, calibrate
from vtexit.methods.vtw.config import VTWConfig, check_layer, valid_layer_range
from vtexit.methods.vtw.policy import WithdrawHandle, WithdrawPolicy


def withdraw(model: nn.Module, layer: int, *, family: FamilySpec | None = None) -> WithdrawHandle:
    """Withdraw all visual tokens before decoder layer ``layer`` (VTW). Returns a handle with ``remove()``.

    Works with plain ``model(...)`` and ``model.generate(...)``: batches with left padding, rows with any number
    of images (or none), the KV cache (withdrawn layers really cache fewer positions), SDPA and eager attention.
    The same as ``vtexit.apply(model, VTWConfig(layer=layer))``.
    """
    return apply(model, VTWConfig(layer=layer), family=family)


__all__ = [
    "DEFAULT_ETA",
    "CalibrationResult",
    "VTWConfig",
    "WithdrawHandle",
    "WithdrawPolicy",
    "calibrate",
    "check_layer",
    "valid_layer_range",
    "withdraw",
]
