"""Hybrids: a pre-LLM reduction (DivPrune), then an in-LLM method (VTW, DyVTE, FastV, ...), in one patch."""

from __future__ import annotations

from typing import Any

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.hybrid.config import HybridConfig
from vtexit.methods.hybrid.policy import HybridPolicy
from vtexit.methods.patch import apply


def hybrid(
    model: nn.Module, *, pre: dict[str, Any], then: dict[str, Any], family: FamilySpec | None = None
) -> PatchHandle:
    """``pre`` (e.g. ``{"method": "divprune", "keep": 0.25}``) shortens the prompt before the language model, then
    ``then`` (e.g. ``{"method": "vtw", "layer": 8}``) acts inside it on what was kept. One handle removes both."""
    return apply(model, HybridConfig(pre=pre, then=then), family=family)


__all__ = ["HybridConfig", "HybridPolicy", "hybrid"]
