"""The object a method returns: it owns the hooks and gives the untouched model back on ``remove()``."""

from __future__ import annotations

from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.layout import Layout


class PatchHandle:
    """Live patch of one model. Use ``remove()`` or a ``with`` block to restore the model."""

    def __init__(self, engine: ScheduleEngine):
        self._engine = engine

    @property
    def model(self) -> nn.Module:
        return self._engine.model

    @property
    def engine(self) -> ScheduleEngine:
        return self._engine

    @property
    def last_layout(self) -> Layout | None:
        """Original positions kept by the last prefill's final stage: logits line up with these slots."""
        return self._engine.last_layout

    @property
    def active(self) -> bool:
        return self._engine.attached

    def remove(self) -> nn.Module:
        """Detach every hook; the model computes exactly what it computed before patching."""
        self._engine.detach()
        return self._engine.model

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
