"""VisionZip's settings: the kept fraction of each image's visual tokens, and the contextual tokens' share of them."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_float, check_renumbering
from vtexit.methods.fastv.ranking import MAX_DENOMINATOR, check_keep, keep_counts
from vtexit.methods.visionzip.anyres import ANYRES_FAMILIES, AnyresVisionZipPolicy, find_anyres_groups
from vtexit.methods.visionzip.policy import VisionZipPolicy
from vtexit.methods.visionzip.tower import CLS_TOWERS, find_selected_layer
from vtexit.methods.visionzip.tower_policy import TowerVisionZipPolicy
from vtexit.methods.visionzip.towers import QWEN_FAMILIES, VIT_FAMILIES, find_qwen_groups, find_vit_groups

PAPER_CONTEXTUAL_SHARE = 10 / 64  # 54 + 10, 108 + 20 and 162 + 30 tokens of LLaVA-1.5's 576 (VisionZip, Table 1)


def split_tokens(patches: int, keep: float, contextual_share: float) -> tuple[int, int]:
    """(dominant, contextual) tokens per image: round half up of ``keep`` x ``patches`` in all (at least one), of which
    round half up of ``contextual_share`` x that are contextual; the dominant ones (CLS included) are at least one."""
    tokens = int(keep_counts(torch.tensor([patches]), keep))  # FastV's count rule, as every method's keep
    share = Fraction(contextual_share).limit_denominator(MAX_DENOMINATOR)
    contextual = min(tokens - 1, int(share * tokens + Fraction(1, 2)))
    return tokens - contextual, contextual


@dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    """Before the language model, each image keeps ``keep`` of its visual tokens: dominant ones (the CLS token and
    the patches it attends to most in the projector's vision-tower layer; without a CLS token, the tokens that
    receive the most attention) and ``contextual_share`` of them as contextual tokens (the other tokens merged by key
    similarity). ``keep=64/576`` on LLaVA-1.5 gives the paper's 54 + 10. LLaVA-1.5-style models with a CLIP, DINOv2
    or SigLIP tower; LLaVA-NeXT and LLaVA-OneVision (tiles, see :mod:`vtexit.methods.visionzip.anyres`); InternVL,
    Gemma3, Idefics3 / SmolVLM and the Qwen-VL families, whose prompt tokens are groups of patches (see
    :mod:`vtexit.methods.visionzip.towers`)."""

    method: ClassVar[str] = "visionzip"
    keep: float
    contextual_share: float = PAPER_CONTEXTUAL_SHARE

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", check_keep(self.keep))
        share = check_float(
            "contextual_share", self.contextual_share, low=0, high=1, high_open=True, what="contextual tokens' share"
        )
        object.__setattr__(self, "contextual_share", share)

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        split = partial(split_tokens, keep=self.keep, contextual_share=self.contextual_share)
        if family.name in ANYRES_FAMILIES:
            source = find_anyres_groups(model)
            check_renumbering(self.method, model, family, before_llm=True)
            return AnyresVisionZipPolicy(source, model.model, split)
        no_cls = family.name == "llava" and model.config.vision_config.model_type not in CLS_TOWERS
        if family.name in VIT_FAMILIES or family.name in QWEN_FAMILIES or no_cls:
            source = find_qwen_groups(model) if family.name in QWEN_FAMILIES else find_vit_groups(model, family.name)
            check_renumbering(self.method, model, family, before_llm=True)
            return TowerVisionZipPolicy(source, split)
        layer = find_selected_layer(model, family.name)
        check_renumbering(self.method, model, family, before_llm=True)
        dominant, contextual = split_tokens(layer.patches, self.keep, self.contextual_share)
        return VisionZipPolicy(layer, dominant, contextual)
