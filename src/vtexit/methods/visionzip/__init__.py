"""VisionZip (arXiv 2412.04467): keep each image's dominant visual tokens and merge the rest, before the LLM."""

from __future__ import annotations

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods.patch import apply
from vtexit.methods.visionzip.config import VisionZipConfig, split_tokens
from vtexit.methods.visionzip.policy import VisionZipPolicy
from vtexit.methods.visionzip.selection import visionzip_tokens


def visionzip(model: nn.Module, *, keep: float, family: FamilySpec | None = None) -> PatchHandle:
    """Each image enters the language model as ``keep`` of its visual tokens: VisionZip's dominant and contextual
    tokens, chosen in the vision tower by its own attention (recomputed, so the tower stays on SDPA): the CLS token's
    where the tower has one, else the attention each token receives. The same as
    ``vtexit.apply(model, VisionZipConfig(keep=...))``."""
    return apply(model, VisionZipConfig(keep=keep), family=family)


__all__ = ["VisionZipConfig", "VisionZipPolicy", "split_tokens", "visionzip", "visionzip_tokens"]
