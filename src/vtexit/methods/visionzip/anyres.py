"""VisionZip on LLaVA-NeXT and LLaVA-OneVision, whose prompt holds each image as a base view, its tiles (unpadded,
OneVision's shrunk when they are many) and a newline token after each row of tile tokens.

The tower scores each tile's patches as on LLaVA-1.5 (the CLS token's attention on CLIP, the attention each patch
receives on SigLIP). The model's own ``pack_image_features`` then lays out the scores and keys exactly as it lays out
the features (the same unpadding and interpolation, newline slots marked), and each image keeps ``keep`` of its
non-newline tokens, chosen among them all; the newline tokens are dropped (VisionZip's LLaVA-NeXT code appends none
to the tiles it zips). ``pack_image_features`` is a method, not a module, so the patch wraps it on the model's core
for as long as it is attached: no module hook sees ``image_sizes`` when ``generate`` encodes the images first."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vtexit.core.vision_compat import packing_replaced, wrap_packing
from vtexit.methods.visionzip.selection import apply_plan, zip_plan
from vtexit.methods.visionzip.tower_policy import TowerVisionZipPolicy
from vtexit.methods.visionzip.towers import ViTGroups, find_vit_groups

ANYRES_FAMILIES = ("llava_next", "llava_onevision")


class AnyresVisionZipPolicy(TowerVisionZipPolicy):
    """Each image keeps ``keep`` of its base-view and tile tokens, in their slots; its newline tokens are dropped."""

    def __init__(self, source: ViTGroups, core: nn.Module, split):
        super().__init__(source, split)
        self.core = core

    def outer_hooks(self, model: nn.Module) -> list:
        core = self.core
        if packing_replaced(core):
            raise ValueError(
                f"visionzip found pack_image_features already replaced on the {self.source.model_type} model"
            )

        def wrap(pack):  # pack: the bound method of the model's class
            def zipped_pack(image_features, image_sizes, *args, **kwargs):
                return self._zip_packed(pack, image_features, image_sizes, args, kwargs)

            return zipped_pack

        restore = wrap_packing(core, wrap)
        return [
            self.source.block.register_forward_pre_hook(self._capture("block"), with_kwargs=True),
            self.source.output.register_forward_hook(self._score),
            restore,
        ]

    def _score(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Each tile's patch scores and keys, for the packing that follows the projector."""
        block_args, block_kwargs = self._taken("block")
        hidden = block_args[0] if block_args else block_kwargs["hidden_states"]
        self._local.seen["scores"] = self.source.scores_and_keys(hidden)

    def _zip_packed(self, pack, image_features, image_sizes, args: tuple, kwargs: dict) -> Any:
        packed, lengths = pack(image_features, image_sizes, *args, **kwargs)
        scores, keys = self._taken("scores")
        tiles = [len(f) for f in image_features]
        marker = dict(kwargs, image_newline=scores.new_full((1,), math.nan))
        packed_scores, _ = pack(list(scores.unsqueeze(-1).split(tiles)), image_sizes, *args, **marker)
        blank = dict(kwargs, image_newline=keys.new_zeros(keys.shape[-1]))
        packed_keys, _ = pack(list(keys.split(tiles)), image_sizes, *args, **blank)
        out, kept = [], []
        for features, score, key in zip(packed, packed_scores, packed_keys, strict=True):
            score = score[:, 0]
            tokens = (~score.isnan()).nonzero()[:, 0]  # the image's slots that are not newline tokens
            chosen, targets, weights = zip_plan(score[None, tokens], key[None, tokens], *self.split(len(tokens)))
            merged = apply_plan(features[None, tokens], targets, weights.to(features.device))[0]
            out.append(features.index_copy(0, tokens.to(features.device), merged))
            kept.append(torch.zeros_like(score, dtype=torch.bool).index_copy(0, tokens, chosen[0]))
        self._note(torch.cat(kept))
        return out, lengths


def find_anyres_groups(model: nn.Module) -> ViTGroups:
    """The scored layer of a LLaVA-NeXT or LLaVA-OneVision tower (each patch a token before packing)."""
    return find_vit_groups(model, "llava")
