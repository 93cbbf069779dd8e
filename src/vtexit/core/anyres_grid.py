"""The visual grid of anyres families (LLaVA-NeXT, LLaVA-OneVision), from ``image_sizes`` and the config.

An anyres image enters the prompt as its base frame (the whole image in one tile: ``side`` x ``side`` tokens,
``side = image_size // patch_size``), then its high-res grid: the tiles' features stitched into one map, cropped back
to the image's aspect ratio (``unpad_image``), each row followed by a newline token (the learned ``image_newline``;
it has the image token id in the prompt). The two parts are different frames. The newline tokens of a high-res grid
are a frame of their own, one column as tall as the grid: a window or a pooled block never mixes them with patches,
and pooling their rows (the same vector) leaves one newline per pooled row, the layout of a smaller anyres grid.

OneVision also: images of rows holding several images are their base frame and one newline (a 1 x 1 frame); a grid
larger than ``anyres_max_N`` tiles is shrunk (bilinear) as transformers does; a video is ``frames`` square frames
(each ``side`` x ``side`` pooled 2 x 2 to ``ceil(side / 2)`` a side) and one newline at its end (a 1 x 1 frame).

The per-image layout is computed on the host from ``image_sizes`` (transformers reads them there too: one read),
with transformers' own helpers; the per-token grid is then one searchsorted on the device. ``generate`` (transformers
5.25) encodes the media before the prefill and hands the core ``mm_encoder_outputs`` instead of the pixels and
``image_sizes``: the layout is then read off those features on the device (no host read): every image's packed
features end with a newline, and the newlines of its high-res grid are that same vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from vtexit.core.grids import VisualGrid
from vtexit.core.transformers_compat import anyres_helpers

_KIND = 1 << 40  # frame ids: images below, videos above


@dataclass(frozen=True)
class Raster:
    """``height`` rows of ``width`` tokens, in the prompt row after row; with ``newline``, each row is followed by one
    newline token (the frame of the newline column). Sizes are ints, or 0-dim device tensors when read off features."""

    height: int | torch.Tensor
    width: int | torch.Tensor
    newline: bool = False

    @property
    def tokens(self) -> int | torch.Tensor:
        return self.height * (self.width + int(self.newline))


def base_side(config: PretrainedConfig) -> int:
    """Tokens per side of one tile (and of the base frame): ``image_size // patch_size``."""
    return config.vision_config.image_size // config.vision_config.patch_size


def anyres_image(config: PretrainedConfig, size_hw: list[int], max_tiles: int | None) -> list[Raster]:
    """The frames of one anyres image of ``size_hw`` (height, width) pixels: base, then the high-res grid with its
    newline column. ``max_tiles``: OneVision's ``anyres_max_N`` (None: LLaVA-NeXT, never shrunk)."""
    grid_shape, unpad = anyres_helpers(config.model_type)
    side = base_side(config)
    tiles_h, tiles_w = grid_shape(size_hw, config.image_grid_pinpoints, config.vision_config.image_size)
    # unpad_image crops a (channels, height, width) map; an empty one gives the cropped shape without the features.
    height, width = unpad(torch.empty(0, tiles_h * side, tiles_w * side), size_hw).shape[1:]
    if max_tiles is not None:
        ratio = math.sqrt(height * width / (max_tiles * side**2))
        if ratio > 1.1:  # as LlavaOnevisionModel.pack_image_features interpolates
            height, width = int(height // ratio), int(width // ratio)
    return [Raster(side, side), Raster(height, width, newline=True)]


def image_rasters(config: PretrainedConfig, inputs: dict) -> list[Raster]:
    """Every image's frames, in the order of ``image_sizes`` (the order the image tokens are filled in)."""
    sizes = inputs.get("image_sizes")
    if sizes is None:
        return encoded_image_rasters(config, inputs)
    onevision = config.model_type == "llava_onevision"
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_")) if onevision else None
    counts = inputs.get("batch_num_images") if onevision else None
    sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
    if counts is None:
        tiled = [True] * len(sizes)
    else:
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        tiled = [n == 1 for n in counts for _ in range(n)]  # as LlavaOnevisionModel.get_image_features
    side = base_side(config)
    rasters = []
    for size, anyres in zip(sizes, tiled, strict=False):
        rasters += anyres_image(config, size, max_tiles) if anyres else [Raster(side, side), Raster(1, 1)]
    return rasters


def _encoded(inputs: dict, modality: str):
    encoded = inputs.get("mm_encoder_outputs") or {}
    output = encoded.get(modality)
    if output is None:
        raise ValueError(
            f"the anyres visual grid needs the call's {'image_sizes' if modality == 'image' else 'pixel_values_videos'}"
            " or its encoded media (mm_encoder_outputs)"
        )
    return output.pooler_output


def encoded_image_rasters(config: PretrainedConfig, inputs: dict) -> list[Raster]:
    """From ``mm_encoder_outputs["image"]`` (each image's packed features): an image of ``side * side + 1`` tokens
    is its base frame and one newline; any other is anyres, its high-res rows ended by copies of its last token."""
    side = base_side(config)
    rasters = []
    for features in _encoded(inputs, "image"):
        if features.shape[0] == side * side + 1:
            rasters += [Raster(side, side), Raster(1, 1)]
            continue
        newline = (features[side * side :] == features[-1]).all(-1)
        rasters += [Raster(side, side), Raster(newline.sum(), newline.long().argmax(), newline=True)]
    return rasters


def video_rasters(config: PretrainedConfig, inputs: dict) -> list[Raster]:
    """OneVision: per video, its frames pooled to ``ceil(side / 2)`` a side, then one newline."""
    pooled = math.ceil(base_side(config) / 2)  # LlavaOnevisionModel.apply_pooling
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        count, frames = videos.shape[:2]
    else:  # (videos, frames * pooled**2 + 1, dim), the newline included
        features = _encoded(inputs, "video")
        count, frames = features.shape[0], (features.shape[1] - 1) // (pooled * pooled)
    return ([Raster(pooled, pooled)] * frames + [Raster(1, 1)]) * count


def place(tokens: torch.Tensor, rasters: list[Raster], kind: int, grid: VisualGrid) -> VisualGrid:
    """``grid`` with the positions flagged in ``tokens`` (batch, length) filled from ``rasters``, in row-major order
    of the batch (transformers' masked_scatter order)."""
    device = tokens.device
    table = [[r.tokens, r.height, r.width, int(r.newline)] for r in rasters]
    if all(isinstance(v, int) for row in table for v in row):
        table = torch.tensor(table, device=device)
    else:  # sizes read off features: stacked on the device, no host read
        table = torch.stack([torch.stack([torch.as_tensor(v, device=device).long() for v in row]) for row in table])
    count, height, width, newline = table.unbind(1)
    ends = count.cumsum(0)
    rank = (tokens.flatten().long().cumsum(0) - 1).view_as(tokens).clamp(min=0)
    item = torch.searchsorted(ends, rank, right=True).clamp(max=len(rasters) - 1)
    local = rank - (ends - count)[item]
    step = (width + newline)[item]
    row, col = local // step, local % step
    is_newline = (newline[item] == 1) & (col == width[item])
    frame = kind * _KIND + 2 * item + is_newline.long()
    return VisualGrid(
        frame=torch.where(tokens, frame, grid.frame),
        row=torch.where(tokens, row, grid.row),
        col=torch.where(tokens & ~is_newline, col, torch.where(tokens, 0, grid.col)),
        height=torch.where(tokens, height[item], grid.height),
        width=torch.where(tokens, torch.where(is_newline, 1, width[item]), grid.width),
        pitch=torch.where(tokens, step, grid.row_step),
    )


def anyres_grid(config: PretrainedConfig, media: torch.Tensor, inputs: dict) -> VisualGrid:
    """LLaVA-NeXT / LLaVA-OneVision: images (and OneVision videos) laid out as the module docstring says."""
    input_ids = inputs["input_ids"]
    empty = torch.zeros_like(input_ids)
    grid = VisualGrid(frame=torch.full_like(input_ids, -1), row=empty, col=empty, height=empty, width=empty)
    kinds = (
        ("image_token_id", "pixel_values", image_rasters),
        ("video_token_id", "pixel_values_videos", video_rasters),
    )
    for kind, (attr, pixels, rasters_of) in enumerate(kinds):
        token = getattr(config, attr, None)
        # A prompt with media passes their pixels or their encoded features (the engine refuses one that does not):
        # neither, no media of the kind.
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image" if kind == 0 else "video")
        given = inputs.get(pixels) is not None or (kind == 0 and inputs.get("image_sizes") is not None)
        if token is None or not (given or encoded is not None):
            continue
        rasters = rasters_of(config, inputs)
        if rasters:
            grid = place((input_ids == token) & media.to(input_ids.device), rasters, kind, grid)
    return grid
