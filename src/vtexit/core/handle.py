"""The object a method returns: it owns the hooks and replaced forwards, and gives the untouched model back on
``remove()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from vtexit.core.costs import RunCost
from vtexit.core.engine import ScheduleEngine
from vtexit.core.layout import Layout


class PatchHandle:
    """Live patch of one model. Use ``remove()`` or a ``with`` block to restore the model."""

    def __init__(self, engine: ScheduleEngine, config: Any = None):
        self._engine = engine
        self.config = config  # the method config that made this patch (a vtexit.MethodConfig); None for a policy
        engine.handle = self

    @property
    def model(self) -> nn.Module:
        return self._engine.model

    @property
    def engine(self) -> ScheduleEngine:
        return self._engine

    @property
    def last_layout(self) -> Layout | None:
        """Original positions held by the slots of the last call in this thread (logits line up with them);
        None when that call withdrew nothing (no media, or a cache vtexit did not compact)."""
        return self._engine.last_layout

    @property
    def last_cost(self) -> RunCost | None:
        """What each layer computed in the last prefill in this thread and the decode steps that continued it."""
        return self._engine.last_cost

    @property
    def last_policy_state(self) -> dict:
        """What the policy recorded in ``view.state`` during the last prefill in this thread."""
        return self._engine.last_policy_state

    @property
    def active(self) -> bool:
        return self._engine.attached

    def remove(self) -> nn.Module:
        """Detach every hook and replaced forward; the model computes exactly what it computed before patching.

        Caches filled under the patch with withdrawn layers refuse to be continued afterwards (they hold fewer
        positions than the unpatched model expects)."""
        self._engine.detach()
        return self._engine.model

    def __enter__(self) -> PatchHandle:
        if not self.active:  # the model runs unpatched: a with block would silently measure the plain model
            raise ValueError(
                f"this {type(self).__name__} has been removed, so the model is no longer patched; patch it again "
                "(e.g. handle = vtexit.apply(model, config)) and use that handle in the with block"
            )
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"{type(self).__name__}({self.config!r}, {state})"


def patch_of(model: nn.Module) -> PatchHandle | None:
    """The handle of the vtexit patch on ``model`` (also on a ``copy.deepcopy`` of a patched model), or None."""
    engine = getattr(model, "_vtexit_engine", None)
    return engine.handle if engine is not None else None
