"""What the vLLM plugin does to each image's visual tokens, without vLLM: the kept count (a function of the image's
token count and the config only, since vLLM sizes the prompt before the encoder runs) and the kept tokens, chosen by
vtexit's own selection code (the same functions the transformers path calls)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vtexit.methods.base import MethodConfig
from vtexit.methods.baseline.config import BaselineConfig
from vtexit.methods.divprune import DivPruneConfig
from vtexit.methods.divprune.selection import max_min_diverse
from vtexit.methods.fastv.ranking import keep_counts
from vtexit.methods.pool import PoolConfig
from vtexit.methods.pool.blocks import block_leaders, block_means, pool_square_grid, pooled_count
from vtexit.methods.registry import config_from_dict
from vtexit.methods.visionzip import VisionZipConfig, split_tokens
from vtexit.methods.visionzip.selection import apply_plan, cls_attention_and_keys, visionzip_tokens, zip_plan
from vtexit.methods.visionzip.towers import ViTGroups

SUPPORTED = ("pool", "divprune", "visionzip")


class ImageReduction:
    """A pre-LLM method applied to one image's projected visual tokens at a time. ``{"method": "none"}`` (vtexit's
    baseline) keeps every token: the model as vLLM's LLaVA would run it, for towers vLLM's LLaVA lacks (DINOv2)."""

    def __init__(self, config: MethodConfig):
        if not isinstance(config, (BaselineConfig, PoolConfig, DivPruneConfig, VisionZipConfig)):
            raise ValueError(
                f"vtexit's vLLM plugin runs the pre-LLM methods {', '.join(SUPPORTED)}; {config.method!r} is not "
                "supported there (use vtexit on transformers for it)"
            )
        self.config = config

    @classmethod
    def from_setting(cls, setting: Any) -> ImageReduction:
        """From the ``vtexit`` entry of the model's config: a method config or its dict (``{"method": "pool",
        "stride": 2}``, as :func:`vtexit.config_from_dict` reads it)."""
        if isinstance(setting, MethodConfig):
            return cls(setting)
        if isinstance(setting, Mapping):
            return cls(config_from_dict(dict(setting)))
        raise ValueError(
            "the model config's 'vtexit' entry must be a method's dict, e.g. "
            f'{{"method": "pool", "stride": 2}}; got {type(setting).__name__}'
        )

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def one_image_per_prompt(self) -> bool:
        """DivPrune's transformers path chooses over all the visual tokens of a row; per image, it is the same only
        with one image in the prompt."""
        return isinstance(self.config, DivPruneConfig)

    @property
    def in_tower(self) -> bool:
        """VisionZip chooses and merges its tokens in the vision tower, from the selected layer's attention: the
        model hands it that layer's outputs (:meth:`zip_tower`), and :meth:`reduce` then has nothing left to do."""
        return isinstance(self.config, VisionZipConfig)

    def zip_tower(self, features: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
        """(images, count(patches), dim) VisionZip's tokens ``[CLS, dominant patches..., contextual...]`` from the
        selected tower layer's output ``features`` (images, 1 + patches, dim; CLS first) and that layer's CLS query
        projection ``query`` (images, 1, dim) and key projections ``keys`` (images, 1 + patches, dim)."""
        attention, mean_keys = cls_attention_and_keys(query, keys, heads)
        return self.zip_cls(features, attention, mean_keys)

    def zip_cls(self, features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(images, count(patches), dim) VisionZip's tokens ``[CLS, dominant patches..., contextual...]`` from the
        selected layer's output ``features`` (images, 1 + patches, dim; CLS first), the CLS token's attention to each
        patch (images, patches) and the keys, mean over heads (images, 1 + patches, head_dim)."""
        dominant, contextual = split_tokens(features.shape[1] - 1, self.config.keep, self.config.contextual_share)
        return visionzip_tokens(features, cls_attention, keys, dominant, contextual)

    def zip_patches(
        self,
        projected: torch.Tensor,
        hidden: torch.Tensor,
        norm: nn.Module,
        query: nn.Module,
        key: nn.Module,
        heads: int,
    ) -> tuple[torch.Tensor, ...]:
        """VisionZip on a tower without CLS token (SigLIP), whose patches are each a prompt token: per image, the
        projector's output ``projected`` (images, patches, dim) cut to its ``count(patches)`` kept tokens in their
        order, each contextual target the mean of its group. The scores (attention received, mean over heads and
        queries) and keys come from the selected layer's input ``hidden`` (images, patches, dim) through its
        ``norm`` and ``query`` / ``key`` projections, by the transformers path's own code."""
        patches = projected.shape[1]
        source = ViTGroups(
            model_type="llava",
            block=None,
            norm=norm,
            query=query,
            key=key,
            query_norm=None,
            key_norm=None,
            heads=heads,
            cls=False,
            groups=torch.arange(patches).view(-1, 1),
            output=None,
        )
        scores, keys = source.scores_and_keys(hidden)
        split = split_tokens(patches, self.config.keep, self.config.contextual_share)
        kept, targets, weights = zip_plan(scores, keys, *split)
        merged = apply_plan(projected, targets, weights.to(projected.device))
        return tuple(row[mask] for row, mask in zip(merged, kept, strict=True))

    def check_tokens(self, tokens: int) -> None:
        """Refuse a per-image token count the method cannot reduce (ValueError)."""
        if isinstance(self.config, PoolConfig):
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(f"pool needs a square grid of visual tokens per image, got {tokens} tokens")
            if self.config.stride > side:
                raise ValueError(
                    f"stride={self.config.stride} is larger than this model's {side} x {side} grid of visual tokens "
                    f"per image; set stride to an int in [2, {side}]"
                )

    def count(self, tokens: int) -> int:
        """Visual tokens per image that the language model sees, for an image the encoder gives ``tokens`` for."""
        if tokens <= 0 or isinstance(self.config, BaselineConfig):
            return tokens
        if isinstance(self.config, PoolConfig):
            self.check_tokens(tokens)
            return pooled_count(math.isqrt(tokens), self.config.stride)
        if isinstance(self.config, VisionZipConfig):
            return sum(split_tokens(tokens, self.config.keep, self.config.contextual_share))
        return int(keep_counts(torch.tensor([tokens]), self.config.keep)[0])

    def reduce(self, features: torch.Tensor) -> torch.Tensor:
        """(count(tokens), dim): one image's projected tokens (tokens, dim) reduced, kept tokens in their order."""
        tokens = features.shape[0]
        if self.in_tower or isinstance(self.config, BaselineConfig):  # zip_tower already chose them, or none leave
            return features
        if isinstance(self.config, PoolConfig):
            return pool_square_grid(features, math.isqrt(tokens), self.config.stride)
        candidates = torch.ones(1, tokens, dtype=torch.bool, device=features.device)
        count = torch.tensor([self.count(tokens)], device=features.device)
        chosen = max_min_diverse(features.unsqueeze(0), candidates, count)[0]
        return features[chosen]

    def grid_count(self, rows: int, cols: int) -> int:
        """Visual tokens the language model sees for an image of ``rows`` x ``cols`` tokens (a Qwen-VL image's
        merged grid): pool keeps one per ``stride`` x ``stride`` block (smaller at odd edges), divprune its share."""
        if isinstance(self.config, PoolConfig):
            stride = self.config.stride
            return -(-rows // stride) * -(-cols // stride)
        return self.count(rows * cols)

    def reduce_grid(
        self,
        features: torch.Tensor,
        rows: int,
        cols: int,
        scores: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's tokens (rows * cols, dim; row-major) reduced: the kept tokens (grid_count, dim) in their order
        and each one's place on the grid (grid_count,) (pool: its block's top-left token, where the transformers
        path puts the block's mean; visionzip: each contextual target's own place, holding its group's mean).
        VisionZip reads each token's ``scores`` (tokens,) and ``keys`` (tokens, head_dim) from the tower."""
        tokens = features.shape[0]
        if tokens != rows * cols:
            raise ValueError(f"expected {rows} x {cols} = {rows * cols} visual tokens for the image, got {tokens}")
        index = torch.arange(tokens, device=features.device)
        if isinstance(self.config, BaselineConfig):
            return features, index
        if isinstance(self.config, PoolConfig):
            stride = self.config.stride
            row, col = index // cols, index % cols
            leader = block_leaders(index, row, col, torch.full_like(index, cols), stride)
            means = block_means(features, leader, tokens)
            first = (row % stride == 0) & (col % stride == 0)
            return means[first], index[first]
        if isinstance(self.config, VisionZipConfig):
            if scores is None or keys is None:
                raise ValueError("visionzip needs the tower's scores and keys of the image's tokens")
            split = split_tokens(tokens, self.config.keep, self.config.contextual_share)
            kept, targets, weights = zip_plan(scores[None], keys[None], *split)
            merged = apply_plan(features[None], targets, weights.to(features.device))[0]
            return merged[kept[0]], index[kept[0]]
        candidates = torch.ones(1, tokens, dtype=torch.bool, device=features.device)
        count = torch.tensor([self.grid_count(rows, cols)], device=features.device)
        chosen = max_min_diverse(features.unsqueeze(0), candidates, count)[0]
        return features[chosen], index[chosen]
