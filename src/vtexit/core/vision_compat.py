"""The vision towers' side of :mod:`vtexit.core.transformers_compat`: every transformers internal that a method
reading a vision tower uses (VisionZip's scores in the tower), with the releases each item was read from.

Same rules as transformers_compat (its tested range, ``TESTED_FLOOR`` up to ``TESTED_NEXT``): an item says which
releases behave how, and the next release that moves one is fixed here. The module trees themselves (a block's
``attn`` / ``norm1``, a tower's ``blocks``, ``layer_norm1``) are read where they are used, as in core.families.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "PACK_METHOD",
    "PIXEL_SHUFFLE",
    "full_attention_blocks",
    "packing_replaced",
    "pixel_shuffle",
    "qwen_block_call",
    "qwen_qkv",
    "qwen_tower_grid",
    "qwen_window_index",
    "set_tower_features",
    "tower_features",
    "wrap_packing",
]


# ------------------------------------------------------------------------------------------------ pixel shuffle
# InternVL's core and the Idefics3 / SmolVLM connector merge neighbouring patches into one prompt token with a
#   ``pixel_shuffle`` method (5.17-5.25, the same code in both): InternVL's ``core.pixel_shuffle(features, scale_factor=
#   config.downsample_ratio)`` takes (batch, side, side, channels) with a ratio < 1 (0.5: 2x2 patches a token); the
#   connector's ``pixel_shuffle(x, scale_factor)`` takes (batch, patches, channels) with ``connector.scale_factor``
#   (2: 2x2). Each output token's channels are its patches' channels concatenated, so shuffling a patch index (one
#   channel) gives each token's patches.
PIXEL_SHUFFLE = "pixel_shuffle"


def pixel_shuffle(owner: nn.Module) -> Callable | None:
    """The bound ``pixel_shuffle`` of an InternVL core or an Idefics3 / SmolVLM connector (None if it has none)."""
    return getattr(owner, PIXEL_SHUFFLE, None)


# ------------------------------------------------------------------------------------------------ Qwen-VL towers
# Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision transformers (``core.visual``, 5.17-5.25): the tower is called as
#   ``visual(hidden_states, grid_thw=...)`` from ``get_image_features`` (grid (images, 3): frames, patch rows, patch
#   columns) and calls each block as ``blk(hidden_states, cu_seqlens=..., max_seqlen=..., position_embeddings=(cos,
#   sin))``, ``cu_seqlens`` the images' (2.5-VL's windowed blocks: the windows') bounds in the patch sequence.
def qwen_tower_grid(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``grid_thw`` of a captured call of a Qwen-VL tower (None if the call has none)."""
    return kwargs.get("grid_thw", args[1] if len(args) > 1 else None)


def qwen_block_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, Any]:
    """``(hidden_states, cu_seqlens, position_embeddings)`` of a captured call of a Qwen-VL vision block (the last
    two None if the call lacks them)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    bounds = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
    return hidden, bounds, kwargs.get("position_embeddings")


# A block's attention projects queries, keys and values with one ``attn.qkv`` linear layer (5.17-5.25, all three
#   families): its output (patches, 3 * dim) is read as (patches, 3, heads, head_dim), query, key, value in that
#   order, and the rotary embedding is applied to queries and keys in rotate-half form.
def qwen_qkv(attention: nn.Module) -> nn.Module | None:
    """The fused query/key/value projection of a Qwen-VL vision attention, one tensor out (transformers' ``nn.Linear``,
    or the vLLM plugin's view of vLLM's fused projection); None if it has none."""
    found = getattr(attention, "qkv", None)
    return found if isinstance(found, nn.Module) else None


# Qwen2.5-VL's vision config lists the blocks with full attention, ``fullatt_block_indexes`` (5.17-5.25; the others
#   attend within windows); Qwen2-VL's and Qwen3-VL's have no such attribute (every block attends over each image).
def full_attention_blocks(vision_config: Any) -> list[int] | None:
    """The indexes of a windowed tower's full-attention blocks; None when the tower has no windowed blocks."""
    return getattr(vision_config, "fullatt_block_indexes", None)


# Where the blocks are windowed, the tower reorders the patches (in groups of ``spatial_merge_size ** 2``) into window
#   order before its first block and restores the order after its merger. 5.17-5.25 compute that order with
#   ``transformers.vision_utils.get_vision_window_index(grid_thw, spatial_merge_size=, window_size=, patch_size=)``
#   -> (window index, window bounds) (the same code in both); releases before ``vision_utils`` had it as the tower's
#   method ``get_window_index(grid_thw)``, which is used where a tower has it.
def qwen_window_index(tower: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
    """The tower's window order of the merged patch groups of ``grid``'s images (None if this release has none)."""
    getter = getattr(tower, "get_window_index", None)
    if getter is not None:
        return getter(grid)[0]
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        return None
    config = tower.config
    return get_vision_window_index(
        grid,
        spatial_merge_size=config.spatial_merge_size,
        window_size=config.window_size,
        patch_size=config.patch_size,
    )[0]


# The tower's output (5.17-5.25): ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the merged tokens of
#   all images of the call (tokens, hidden), in the prompt's order (2.5-VL's back out of window order); Qwen3-VL's
#   ``BaseModelOutputWithDeepstackFeatures`` adds ``deepstack_features``, one (tokens, hidden) tensor per
#   ``deepstack_visual_indexes`` entry, rows as ``pooler_output``'s. ``get_image_features`` splits them per image
#   after the tower returns.
def tower_features(output: Any) -> list[torch.Tensor]:
    """``[pooler_output, *deepstack_features]`` of a Qwen-VL tower's output (no deepstack rows elsewhere)."""
    return [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]


def set_tower_features(output: Any, features: list[torch.Tensor]) -> Any:
    """Replace what :func:`tower_features` read with ``features`` (the same order) in ``output``, and return it."""
    output.pooler_output = features[0]
    if len(features) > 1:
        output.deepstack_features = list(features[1:])
    return output


# ------------------------------------------------------------------------------------------------ anyres packing
# LLaVA-NeXT's and LLaVA-OneVision's cores lay out each image's tile features with the method ``pack_image_features``
#   (5.17-5.25): NeXT's ``(image_features, image_sizes, vision_feature_select_strategy, image_newline=None)``,
#   OneVision's ``(image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9")``, each
#   returning (per image its packed features (tokens, hidden), the lengths). ``get_image_features`` calls it on the
#   core as ``self.pack_image_features(...)`` with ``image_newline`` by keyword, so an instance attribute of that
#   name replaces it for that core only (the top model's own ``pack_image_features`` forwards to the core's).
PACK_METHOD = "pack_image_features"


def packing_replaced(core: nn.Module) -> bool:
    """Whether ``core``'s ``pack_image_features`` is already replaced on the instance."""
    return PACK_METHOD in core.__dict__


class _RestorePacking:
    """Restores the core's own ``pack_image_features`` (a handle like the hooks' RemovableHandle)."""

    def __init__(self, core: nn.Module):
        self.core = core

    def remove(self) -> None:
        self.core.__dict__.pop(PACK_METHOD, None)


def wrap_packing(core: nn.Module, wrap: Callable[[Callable], Callable]) -> _RestorePacking:
    """Replace ``core``'s ``pack_image_features`` with ``wrap(the class's bound method)`` until the returned
    handle's ``remove()``."""
    setattr(core, PACK_METHOD, wrap(getattr(core, PACK_METHOD)))
    return _RestorePacking(core)
