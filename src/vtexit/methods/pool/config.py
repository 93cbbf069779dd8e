"""Pooling's setting: the block side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.grids import SquareRuns
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_int, check_renumbering, shown
from vtexit.methods.pool.policy import PoolPolicy


@dataclass(frozen=True)
class PoolConfig(MethodConfig):
    """Before the language model, average each image's ``stride`` x ``stride`` blocks of visual tokens into one
    token (2: a quarter of the tokens). Needs the family's visual grid (every built-in family describes one); a
    block never crosses a frame's border (a tile, a video frame, an anyres newline column). A stride larger than
    the side of a grid the config fixes is refused when the patch is applied (it would pool as the side does)."""

    method: ClassVar[str] = "pool"
    stride: int = 2

    def __post_init__(self) -> None:
        stride = check_int("stride", self.stride, low=2, what="the side of the pooled blocks")
        object.__setattr__(self, "stride", stride)

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        policy = PoolPolicy(self.stride, family, model.config)  # refuses a family without a visual grid
        check_renumbering(self.method, model, family, before_llm=True)
        side = grid_side(model, family)
        if side is not None and self.stride > side:
            stride = shown(self.stride)
            raise ValueError(
                f"stride={stride} is larger than this model's {side} x {side} grid of visual tokens per image (every "
                f"image would become one token, as with stride={side}); set stride to an int in [2, {side}]"
                if side >= 2
                else f"stride={stride}: this model's images are a 1 x 1 grid of visual tokens, nothing to pool"
            )
        return policy


def grid_side(model: nn.Module, family: FamilySpec) -> int | None:
    """The side of every frame's square grid of visual tokens when the model's config fixes it (LLaVA-1.5, InternVL
    tiles, Idefics3 crops, Gemma3 images); None when the grid is known only from each call's inputs (Qwen2-VL's
    dynamic resolution, anyres images)."""
    if not isinstance(family.visual_grid, SquareRuns):
        return None
    try:
        return family.visual_grid.side_of(model.config)
    except ValueError as err:
        raise ValueError(f"pool needs each image's square grid of visual tokens: {err}") from None
