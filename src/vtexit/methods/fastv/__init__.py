"""FastV (arXiv 2403.06764) on the engine contract: an attention-ranked partial drop of visual tokens at one layer,
at any batch size and under SDPA. ``ranking`` holds the keep-the-top-fraction step PyramidDrop and the random
baseline share."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.fastv.config import FastVConfig
from vtexit.methods.fastv.policy import FastVPolicy
from vtexit.methods.patch import apply


def fastv(model: nn.Module, *, layer: int, keep: float, family: FamilySpec | None = None) -> PatchHandle:
    """FastV: before decoder layer ``layer`` (K) each row keeps the fraction ``keep`` (R) of its visual tokens that
    its last prompt token attends to most at layer K - 1 (mean over heads). Returns a handle with ``remove()``.

    The kept count is round-half-up of R x the row's visual tokens (at least one); ties go to the lower position.
    ``handle.last_policy_state["kept"][K]`` shows the kept original positions of the last call. The same as
    ``vtexit.apply(model, FastVConfig(layer=K, keep=R))``.
    """
    return apply(model, FastVConfig(layer=layer, keep=keep), family=family)


__all__ = ["FastVConfig", "FastVPolicy", "fastv"]
