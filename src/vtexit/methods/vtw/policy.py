"""VTW, Visual Tokens Withdrawal (Lin et al., arXiv 2405.05803): the schedule.

Layers ``0..K-1`` see the full sequence; from layer ``K`` on, every visual token is withdrawn and only the text
tokens (with their original positions) go on. The paper picks K on a calibration set as the first layer where
KL(full model || withdrawn model) falls below a threshold, see :mod:`vtexit.methods.vtw.calibrate`.
"""

from __future__ import annotations

import torch

from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy, PrefillView


class WithdrawPolicy(Policy):
    """Drop every media slot before decoder layer ``layer``."""

    def __init__(self, layer: int):
        self.layer = layer
        self.event_layers = frozenset({layer})
        self.withdraw_media_at = layer

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer:
            return None
        return view.text


class WithdrawHandle(PatchHandle):
    """Handle of a VTW patch; ``layer`` is the withdrawal layer K."""

    @property
    def layer(self) -> int:
        return self.config.layer

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"WithdrawHandle(layer={self.layer}, num_layers={self.engine.num_layers}, {state})"
