"""YOPO-style pruning of visual computation ("Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts
to See", arXiv 2410.06169), with savings that are compute not done: windowed visual attention, heads pruned for
visual tokens, visual layer drop (withdrawal) and a sparse visual FFN."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.patch import apply
from vtexit.methods.yopo.config import YOPOConfig
from vtexit.methods.yopo.heads import HeadMask, calibrate_heads, heads_from_scores, score_heads
from vtexit.methods.yopo.policy import YOPOPolicy


def yopo(model: nn.Module, config: YOPOConfig, *, family: FamilySpec | None = None) -> PatchHandle:
    """Patch ``model`` with the YOPO strategies ``config`` turns on; the handle's ``remove()`` restores it.
    The same as ``vtexit.apply(model, config)``."""
    if not isinstance(config, YOPOConfig):
        raise ValueError(f"config must be a vtexit.YOPOConfig, got {type(config).__name__}")
    return apply(model, config, family=family)


__all__ = [
    "HeadMask",
    "YOPOConfig",
    "YOPOPolicy",
    "calibrate_heads",
    "heads_from_scores",
    "score_heads",
    "yopo",
]
