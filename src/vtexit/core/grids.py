"""Where each visual token sits on its image's patch grid, for methods that look at spatial neighbours.

A family describes its geometry with a function ``(config, media, inputs) -> VisualGrid``: ``media`` flags the
visual tokens of the prompt, ``inputs`` holds its ``input_ids`` and the multimodal core's kwargs the family names in
``FamilySpec.grid_inputs``. Layouts of the built-in families:

* runs of square frames (:class:`SquareRuns`): every visual token belongs to a run of ``side * side`` tokens, one
  frame, row-major: an image (LLaVA-1.5, Gemma3), a tile after pixel shuffle (InternVL), a crop or the global image
  (Idefics3 / SmolVLM); the side comes from the config;
* Qwen2-VL style (``image_grid_thw`` / ``video_grid_thw`` in patches, merged ``spatial_merge_size`` x
  ``spatial_merge_size``; a video is ``t`` frames of one grid);
* anyres (LLaVA-NeXT, LLaVA-OneVision: :mod:`vtexit.core.anyres_grid`): a base frame, then the unpadded high-res
  grid whose rows each end with a newline token.

Everything is computed on the device, without a sync (anyres reads ``image_sizes`` on the host, as transformers
does). Every frame's tokens are consecutive in the prompt, row-major, except that a row may be followed by tokens of
another frame (anyres newline tokens): the token ``dr`` rows and ``dc`` columns away sits ``dr * row_step + dc``
positions away (``row_step``: ``pitch``, or ``width`` when the grid has no pitch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class VisualGrid:
    """Per prompt position (batch, length), long tensors; at non-visual positions ``frame`` is -1, the rest 0.

    ``frame`` identifies the image (or video frame) within the row; ``row``/``col`` the token's place on that
    frame's grid of ``height`` x ``width`` tokens; ``pitch`` the prompt positions from one row of the frame to the
    next (None: ``width``, the rows are back to back)."""

    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    pitch: torch.Tensor | None = None

    @property
    def row_step(self) -> torch.Tensor:
        """Prompt positions between a token and the one below it on its frame."""
        return self.width if self.pitch is None else self.pitch


def square_side(config: PretrainedConfig) -> int:
    """LLaVA-1.5 style: the side of the square grid of ``image_seq_length`` tokens per image (ValueError if none)."""
    tokens = getattr(config, "image_seq_length", None)
    side = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
    if side * side != tokens:
        raise ValueError(
            f"image_seq_length={tokens!r} is not a square number of tokens, so the image's patch grid is unknown "
            "(e.g. a CLS token is kept: vision_feature_select_strategy='full')"
        )
    return side


def _pair(value: int | list | tuple) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def internvl_side(config: PretrainedConfig) -> int:
    """InternVL: a tile's ``image_size / patch_size`` patches a side, pixel-shuffled by ``downsample_ratio``, as
    ``InternVLModel.get_image_features`` reshapes them."""
    vision = config.vision_config
    (height, width), (patch_h, patch_w) = _pair(vision.image_size), _pair(vision.patch_size)
    if height // patch_h != width // patch_w:
        raise ValueError(f"InternVL tiles of {height} x {width} pixels are not a square grid of patches")
    return int(height // patch_h * config.downsample_ratio)


def idefics3_side(config: PretrainedConfig) -> int:
    """Idefics3 / SmolVLM: a crop's ``image_size // patch_size`` patches a side, pixel-shuffled by ``scale_factor``
    (the connector's ``image_seq_len`` tokens)."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size // config.scale_factor


def gemma3_side(config: PretrainedConfig) -> int:
    """Gemma3: the projector average-pools the tower's patch grid to ``mm_tokens_per_image`` tokens, a square."""
    tokens = config.mm_tokens_per_image
    patches = config.vision_config.image_size // config.vision_config.patch_size
    kernel = patches // math.isqrt(tokens) if tokens > 0 else 0
    side = patches // kernel if kernel > 0 else 0
    if side * side != tokens:
        raise ValueError(f"mm_tokens_per_image={tokens} is not the projector's square grid ({side} x {side})")
    return side


def square_runs(media: torch.Tensor, side: int) -> VisualGrid:
    """The k-th run of ``side * side`` visual tokens of a row is its frame k, a square grid, row-major."""
    rank = media.long().cumsum(1) - 1
    local = rank % (side * side)
    zero = torch.zeros_like(rank)
    return VisualGrid(
        frame=torch.where(media, rank // (side * side), -1),
        row=torch.where(media, local // side, zero),
        col=torch.where(media, local % side, zero),
        height=torch.where(media, side, zero),
        width=torch.where(media, side, zero),
    )


@dataclass(frozen=True)
class SquareRuns:
    """A layout of square frames of one side, fixed by the config (``side_of``): every frame is a run of
    ``side * side`` visual tokens (see :func:`square_runs`). Callable as a family's ``visual_grid``."""

    side_of: Callable[[PretrainedConfig], int]

    def __call__(self, config: PretrainedConfig, media: torch.Tensor, inputs: dict) -> VisualGrid:
        return square_runs(media, self.side_of(config))


# LLaVA-1.5: the k-th run of ``image_seq_length`` image tokens in a row is image k.
square_grid = SquareRuns(square_side)
# InternVL: an image is its tiles (crops, then the thumbnail) between ``<img>`` and ``</img>``, each tile a frame.
internvl_grid = SquareRuns(internvl_side)
# Idefics3 / SmolVLM: each crop and the global image is a run of ``image_seq_len`` tokens between text tokens.
idefics3_grid = SquareRuns(idefics3_side)
# Gemma3: each image is ``mm_tokens_per_image`` tokens between ``<start_of_image>`` and ``<end_of_image>``.
gemma3_grid = SquareRuns(gemma3_side)


def qwen_grid(config: PretrainedConfig, media: torch.Tensor, inputs: dict) -> VisualGrid:
    """Qwen2-VL style. ``generate`` passes the M-RoPE position ids (and no grids) to the multimodal core: read the
    grid from them when given, else from ``image_grid_thw`` / ``video_grid_thw``."""
    positions = inputs.get("position_ids")
    if positions is not None and positions.ndim == 3 and positions.shape[0] >= 3:
        return mrope_grid(media, positions[-3:])
    return merged_thw_grid(config, inputs["input_ids"], inputs)


def mrope_grid(media: torch.Tensor, thw: torch.Tensor) -> VisualGrid:
    """From M-RoPE (temporal, height, width) position ids (3, batch, length): a frame is a run of visual tokens with
    one temporal position; a token's row and column are its height and width positions minus the frame's least."""
    t, h, w = thw.to(media.device).expand(-1, *media.shape)
    before = torch.nn.functional.pad(media[:, :-1], (1, 0), value=False)
    t_before = torch.nn.functional.pad(t[:, :-1], (1, 0), value=-1)
    frame = (media & (~before | (t != t_before))).long().cumsum(1) - 1
    frame = torch.where(media, frame, -1)
    batch, length = media.shape
    bucket = torch.where(media, torch.arange(batch, device=media.device).view(-1, 1) * length + frame, batch * length)
    bucket = bucket.flatten()

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        start = torch.zeros(batch * length + 1, dtype=values.dtype, device=values.device)
        per_frame = start.scatter_reduce(0, bucket, values.flatten(), how, include_self=False)
        return per_frame[bucket].view(batch, length)

    top, left = reduce(h, "amin"), reduce(w, "amin")
    zero = torch.zeros_like(media, dtype=torch.long)
    return VisualGrid(
        frame=frame,
        row=torch.where(media, h - top, zero),
        col=torch.where(media, w - left, zero),
        height=torch.where(media, reduce(h, "amax") - top + 1, zero),
        width=torch.where(media, reduce(w, "amax") - left + 1, zero),
    )


def merged_thw_grid(config: PretrainedConfig, input_ids: torch.Tensor, inputs: dict) -> VisualGrid:
    """Qwen2-VL style: images and video frames in the order of ``image_grid_thw`` / ``video_grid_thw`` rows (the
    order transformers fills the placeholders in: row-major over the batch)."""
    merge = config.vision_config.spatial_merge_size
    frame = torch.full_like(input_ids, -1)
    row, col, height, width = (torch.zeros_like(input_ids) for _ in range(4))
    for kind, (token_attr, grid_name) in enumerate(
        (("image_token_id", "image_grid_thw"), ("video_token_id", "video_grid_thw"))
    ):
        token = getattr(config, token_attr, None)
        thw = inputs.get(grid_name)
        if token is None or thw is None or thw.numel() == 0:
            continue
        thw = thw.to(input_ids.device)
        is_kind = input_ids == token
        rank = (is_kind.flatten().long().cumsum(0) - 1).view_as(input_ids).clamp(min=0)
        frame_h, frame_w = thw[:, 1] // merge, thw[:, 2] // merge
        tokens = thw[:, 0] * frame_h * frame_w
        ends = tokens.cumsum(0)
        item = torch.searchsorted(ends, rank, right=True).clamp(max=len(ends) - 1)
        local = rank - (ends - tokens)[item]
        per_frame = (frame_h * frame_w)[item]
        in_frame = local % per_frame
        w = frame_w[item]
        # Ids unique within a row: (kind, item, frame within item).
        frame_id = kind * (1 << 40) + item * (1 << 20) + local // per_frame
        frame = torch.where(is_kind, frame_id, frame)
        row = torch.where(is_kind, in_frame // w, row)
        col = torch.where(is_kind, in_frame % w, col)
        height = torch.where(is_kind, frame_h[item], height)
        width = torch.where(is_kind, w, width)
    return VisualGrid(frame=frame, row=row, col=col, height=height, width=width)


# How many visual tokens a batch holds, from the shapes of its pixel inputs alone (no device read), for a compiled
# prefill that must know its compacted length while tracing. None: not known from shapes.
def square_media_count(config: PretrainedConfig, inputs: dict) -> int | None:
    """LLaVA-1.5: ``image_seq_length`` tokens per image of ``pixel_values`` (images, channels, height, width)."""
    pixels = inputs.get("pixel_values")
    tokens = getattr(config, "image_seq_length", None)
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not isinstance(tokens, int):
        return None
    return pixels.shape[0] * tokens


def merged_patch_media_count(config: PretrainedConfig, inputs: dict) -> int | None:
    """Qwen2-VL style: ``pixel_values`` / ``pixel_values_videos`` hold one row per patch, merged
    ``spatial_merge_size`` x ``spatial_merge_size`` into one token."""
    merge = config.vision_config.spatial_merge_size
    total = 0
    for name in ("pixel_values", "pixel_values_videos"):
        pixels = inputs.get(name)
        if pixels is None:
            continue
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 2:
            return None
        total += pixels.shape[0] // (merge * merge)
    return total
