"""PyramidDrop (arXiv 2410.17247) on the engine contract: several attention-ranked stages, each keeping a share of
the visual tokens left, optionally with PyramidDrop's position renumbering."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.patch import apply
from vtexit.methods.pdrop.config import DEFAULT_LAYERS, PDropConfig, parse_layers
from vtexit.methods.pdrop.policy import PyramidDropPolicy


def pdrop(
    model: nn.Module,
    *,
    layers: Sequence[int] = DEFAULT_LAYERS,
    keep: float = 0.5,
    renumber: bool = False,
    family: FamilySpec | None = None,
) -> PatchHandle:
    """PyramidDrop: before each layer of ``layers`` every row keeps the fraction ``keep`` of the visual tokens it
    still holds, those its last prompt token attended to most at the layer before. Returns a handle.

    ``renumber=True`` renumbers the kept tokens' positions after each stage (PyramidDrop's code does); families
    with multimodal RoPE (the Qwen-VL families) refuse it with a ValueError.
    ``handle.last_policy_state["kept"][layer]`` shows what each stage kept in the last call. The same as
    ``vtexit.apply(model, PDropConfig(...))``.
    """
    return apply(model, PDropConfig(layers=layers, keep=keep, renumber=renumber), family=family)


__all__ = ["DEFAULT_LAYERS", "PDropConfig", "PyramidDropPolicy", "parse_layers", "pdrop"]
