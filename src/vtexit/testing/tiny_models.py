"""Tiny, randomly initialised multimodal models built from the *real* transformers classes.

Why: the withdrawal engine hooks the decoder layers of real model classes, so its tests must run
against those classes (toy sizes, random weights) rather than mocks; that catches integration
errors (mask building, rope/position handling, caches, deepstack, ...) in seconds on a CPU.

Nothing is downloaded. Configs are written here, and `TinyCase.inputs` assembles token ids the way
each family's processor would (placeholder expansion, vision start/end wrappers, image grids,
token-type ids, ...), so no tokenizer or processor is needed.

Token-id layout (vocabulary of `V` ids, shared by every family):

* ``0`` pad, ``1`` bos, ``2`` eos;
* the top 16 ids are reserved for media/special tokens (image/video placeholders, wrappers,
  Idefics3's row/column tags);
* random text is drawn from ``[3, V - 16)``, so it never collides with a special id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

__all__ = ["FAMILIES", "TinyCase", "build_llava_shaped", "build_tiny"]

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "idefics3",
    "gemma3",
)

# Shared toy sizes. GQA everywhere (4 query heads over 2 kv heads) because real checkpoints use it
# and the engine has to handle kv-head repetition.
_VOCAB = 256
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = _HIDDEN // _HEADS
_INTERMEDIATE = 128
_MAX_POS = 1024
_V_HIDDEN = 32
_V_INTERMEDIATE = 64
_V_HEADS = 2
# Larger than the usual 0.02 so that attention is not almost uniform: with a near-uniform model,
# tests asking "does removing visual tokens change the output?" would be vacuous.
_INIT_STD = 0.1

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_RESERVED_TOP = 16


@dataclass(frozen=True)
class _Vocab:
    """Where the special ids live in a vocabulary of `size` ids (see the module docstring)."""

    size: int

    @property
    def image(self) -> int:
        return self.size - 6

    @property
    def video(self) -> int:
        return self.size - 5

    @property
    def start(self) -> int:
        """Vision-start / <img> / boi / <fake_token_around_image>, depending on the family."""
        return self.size - 4

    @property
    def end(self) -> int:
        """Vision-end / </img> / eoi / <global-img>, depending on the family."""
        return self.size - 3

    @property
    def extra(self) -> int:
        """A further family token (Idefics3's newline)."""
        return self.size - 2

    def tag(self, i: int) -> int:
        """Idefics3 ``<row_r_col_c>`` tags (up to 8 crops per image)."""
        if not 0 <= i < 8:
            raise ValueError(f"tag index {i} out of range")
        return self.size - _RESERVED_TOP + i

    @property
    def text_range(self) -> tuple[int, int]:
        return 3, self.size - _RESERVED_TOP

    @property
    def specials(self) -> frozenset[int]:
        return frozenset({PAD_ID, BOS_ID, EOS_ID, *range(self.size - _RESERVED_TOP, self.size)})


# ----------------------------------------------------------------------------------------------
# Per-family input layouts
# ----------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """One image or video as it appears in a row: its token ids plus what the collator needs."""

    kind: str  # "image" | "video"
    ids: list[int]
    payload: dict[str, Any]


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _of_kind(rows: list[list[_Block]], kind: str) -> list[_Block]:
    return [b for row in rows for b in row if b.kind == kind]


class _Spec:
    """How one family turns images/videos into token ids and pixel tensors."""

    supports_video = False

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        self.config = config
        self.vocab = vocab

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        raise NotImplementedError

    def video(self, gen: torch.Generator, index: int) -> _Block:
        raise ValueError("this family's tiny case does not take videos")

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token tensors derived from the ids (e.g. ``mm_token_type_ids``)."""
        return {}


class _LlavaSpec(_Spec):
    """LLaVA-1.5: ``<image>`` expanded to one token per CLIP patch, no wrapper tokens."""

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size
        side = vc.image_size // vc.patch_size
        # CLIP prepends a CLS token; the "default" strategy drops it.
        self.tokens = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        pixels = _randn(gen, 3, self.size, self.size)
        return _Block("image", [self.vocab.image] * self.tokens, {"pixels": pixels})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        images = _of_kind(rows, "image")
        return {"pixel_values": torch.stack([b.payload["pixels"] for b in images])} if images else {}


def _best_resolution(size_hw: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """Pick the anyres canvas the LLaVA-NeXT processors pick: largest effective area, then least waste."""
    oh, ow = size_hw
    best: tuple[int, int] | None = None
    best_effective, best_waste = 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / ow, ph / oh)
        effective = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    assert best is not None
    return best


def _anyres_layout(
    size_hw: tuple[int, int], pinpoints: list[list[int]], tile: int, side: int, max_tiles: int | None
) -> tuple[int, int]:
    """(tokens, tiles incl. the base tile) for one anyres image.

    Tokens = base tile + the tile grid unpadded back to the image's aspect ratio, with one newline
    token closing every feature row (OneVision also shrinks grids larger than `max_tiles` tiles).
    """
    bh, bw = _best_resolution(size_hw, pinpoints)
    grid_h, grid_w = math.ceil(bh / tile), math.ceil(bw / tile)
    cur_h, cur_w = grid_h * side, grid_w * side
    oh, ow = size_hw
    if ow / oh > cur_w / cur_h:
        new_h = int(round(oh * (cur_w / ow), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(ow * (cur_h / oh), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if max_tiles is not None:
        ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return side * side + cur_h * (cur_w + 1), grid_h * grid_w + 1


class _LlavaNextSpec(_Spec):
    """LLaVA-NeXT anyres: per-image tile count and token count depend on ``image_sizes``."""

    max_tiles: int | None = None

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.tile = vc.image_size
        self.side = vc.image_size // vc.patch_size
        t = self.tile
        # Cycled over images so that one batch mixes wide, tall and square (unpadded) layouts.
        self.sizes: list[tuple[int, int]] = [(t, 2 * t), (2 * t, t), (t, t)]

    def _anyres(self, gen: torch.Generator, index: int) -> _Block:
        size = self.sizes[index % len(self.sizes)]
        tokens, tiles = _anyres_layout(size, self.config.image_grid_pinpoints, self.tile, self.side, self.max_tiles)
        pixels = _randn(gen, tiles, 3, self.tile, self.tile)
        return _Block("image", [self.vocab.image] * tokens, {"pixels": pixels, "size": size})

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        return self._anyres(gen, index)

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        images = _of_kind(rows, "image")
        if not images:
            return {}
        max_tiles = max(b.payload["pixels"].shape[0] for b in images)
        pixel_values = torch.zeros(len(images), max_tiles, 3, self.tile, self.tile)
        for i, b in enumerate(images):
            pixel_values[i, : b.payload["pixels"].shape[0]] = b.payload["pixels"]
        sizes = torch.tensor([b.payload["size"] for b in images], dtype=torch.long)
        return {"pixel_values": pixel_values, "image_sizes": sizes}


class _LlavaOnevisionSpec(_LlavaNextSpec):
    """OneVision: anyres only for single-image rows; multi-image rows get base tile + newline; videos
    are 2x2-pooled per frame plus one trailing newline."""

    supports_video = True
    frames = 2

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        self.max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        t = self.tile
        # (t, 4t/3) exercises the unpadding of a padded tile grid.
        self.sizes = [(t, t + t // 3), (t, t), (2 * t, t)]

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        if images_in_row == 1:
            return self._anyres(gen, index)
        pixels = _randn(gen, 1, 3, self.tile, self.tile)
        size = (self.tile, self.tile)
        return _Block("image", [self.vocab.image] * (self.side**2 + 1), {"pixels": pixels, "size": size})

    def video(self, gen: torch.Generator, index: int) -> _Block:
        pooled = math.ceil(self.side / 2)
        tokens = self.frames * pooled * pooled + 1
        pixels = _randn(gen, self.frames, 3, self.tile, self.tile)
        return _Block("video", [self.vocab.video] * tokens, {"pixels": pixels})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        out = super().collate(rows)
        if out:
            per_row = [sum(b.kind == "image" for b in row) for row in rows]
            out["batch_num_images"] = torch.tensor(per_row, dtype=torch.long)
        videos = _of_kind(rows, "video")
        if videos:
            out["pixel_values_videos"] = torch.stack([b.payload["pixels"] for b in videos])
        return out


class _QwenSpec(_Spec):
    """Qwen2-VL / 2.5-VL / 3-VL: flattened patches + ``(t, h, w)`` grids, ``<|vision_start|>`` /
    ``<|vision_end|>`` wrappers and ``mm_token_type_ids`` (needed for M-RoPE)."""

    supports_video = True

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        m = vc.spatial_merge_size
        self.merge = m
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        # Grids in patches (multiples of the merge size): 4, 6 and 12 tokens.
        self.grids: list[tuple[int, int, int]] = [(1, 2 * m, 2 * m), (1, 2 * m, 3 * m), (1, 3 * m, 4 * m)]
        self.video_grid = (2, 2 * m, 2 * m)

    def _tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge**2

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        grid = self.grids[index % len(self.grids)]
        ids = [self.vocab.start] + [self.vocab.image] * self._tokens(grid) + [self.vocab.end]
        pixels = _randn(gen, grid[0] * grid[1] * grid[2], self.patch_dim)
        return _Block("image", ids, {"pixels": pixels, "grid": grid})

    def _video_ids(self, gen: torch.Generator, grid: tuple[int, int, int]) -> list[int]:
        return [self.vocab.start] + [self.vocab.video] * self._tokens(grid) + [self.vocab.end]

    def video(self, gen: torch.Generator, index: int) -> _Block:
        grid = self.video_grid
        ids = self._video_ids(gen, grid)
        pixels = _randn(gen, grid[0] * grid[1] * grid[2], self.patch_dim)
        return _Block("video", ids, {"pixels": pixels, "grid": grid})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for kind, pv_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            blocks = _of_kind(rows, kind)
            if blocks:
                out[pv_key] = torch.cat([b.payload["pixels"] for b in blocks])
                out[grid_key] = torch.tensor([b.payload["grid"] for b in blocks], dtype=torch.long)
        return out

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        types = (input_ids == self.vocab.image).long() + 2 * (input_ids == self.vocab.video).long()
        return {"mm_token_type_ids": types}


class _Qwen25Spec(_QwenSpec):
    """Qwen2.5-VL additionally takes the seconds spanned by each temporal video patch."""

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        out = super().collate(rows)
        if "video_grid_thw" in out:
            out["second_per_grid_ts"] = torch.ones(out["video_grid_thw"].shape[0], dtype=torch.float32)
        return out


class _Qwen3Spec(_QwenSpec):
    """Qwen3-VL videos: each temporal patch is its own ``<t seconds><|vision_start|>...<|vision_end|>``
    group (the model's M-RoPE indexing expects text between frames)."""

    def _video_ids(self, gen: torch.Generator, grid: tuple[int, int, int]) -> list[int]:
        t, h, w = grid
        per_frame = self._tokens((1, h, w))
        lo, hi = self.vocab.text_range
        ids: list[int] = []
        for _ in range(t):
            timestamp = int(torch.randint(lo, hi, (1,), generator=gen))
            ids += [timestamp, self.vocab.start] + [self.vocab.video] * per_frame + [self.vocab.end]
        return ids


class _InternVLSpec(_Spec):
    """InternVL: ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``; each image
    is 1 tile or 3 tiles (2 crops + thumbnail), alternately."""

    tiles_cycle = (1, 3)

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size[0]
        side = vc.image_size[0] // vc.patch_size[0]
        out_side = int(side * config.downsample_ratio)
        self.per_tile = out_side * out_side

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        tiles = self.tiles_cycle[index % len(self.tiles_cycle)]
        ids = [self.vocab.start] + [self.vocab.image] * (self.per_tile * tiles) + [self.vocab.end]
        return _Block("image", ids, {"pixels": _randn(gen, tiles, 3, self.size, self.size)})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        images = _of_kind(rows, "image")
        return {"pixel_values": torch.cat([b.payload["pixels"] for b in images])} if images else {}


class _Idefics3Spec(_Spec):
    """Idefics3 / SmolVLM: every image is one global crop, optionally preceded by a grid of crops
    tagged ``<row_r_col_c>``; crops are wrapped in ``<fake_token_around_image>``; pixel tensors are
    per row, zero-padded to the row with the most crops, with a ``pixel_attention_mask``."""

    splits_cycle: tuple[tuple[int, int] | None, ...] = (None, (1, 2))

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        vc = config.vision_config
        self.size = vc.image_size
        side = vc.image_size // vc.patch_size // config.scale_factor
        self.per_crop = side * side

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        v = self.vocab
        fake, global_img, newline = v.start, v.end, v.extra
        seq = [v.image] * self.per_crop
        split = self.splits_cycle[index % len(self.splits_cycle)]
        ids: list[int] = []
        crops = 1
        if split is not None:
            n_rows, n_cols = split
            for r in range(n_rows):
                for c in range(n_cols):
                    ids += [fake, v.tag(r * n_cols + c)] + seq
                ids.append(newline)
            ids.append(newline)
            crops += n_rows * n_cols
        ids += [fake, global_img] + seq + [fake]
        return _Block("image", ids, {"pixels": _randn(gen, crops, 3, self.size, self.size)})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        per_row = [[b.payload["pixels"] for b in row if b.kind == "image"] for row in rows]
        crops = [torch.cat(p) if p else torch.zeros(0, 3, self.size, self.size) for p in per_row]
        max_crops = max(c.shape[0] for c in crops)
        if max_crops == 0:
            return {}
        pixel_values = torch.zeros(len(rows), max_crops, 3, self.size, self.size)
        mask = torch.zeros(len(rows), max_crops, self.size, self.size, dtype=torch.bool)
        for b, c in enumerate(crops):
            pixel_values[b, : c.shape[0]] = c
            mask[b, : c.shape[0]] = True
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


class _Gemma3Spec(_Spec):
    """Gemma 3: ``<start_of_image>`` + ``mm_tokens_per_image`` soft tokens + ``<end_of_image>``, and
    ``token_type_ids`` marking image tokens (they attend to each other bidirectionally)."""

    def __init__(self, config: PretrainedConfig, vocab: _Vocab) -> None:
        super().__init__(config, vocab)
        self.size = config.vision_config.image_size
        self.tokens = config.mm_tokens_per_image

    def image(self, gen: torch.Generator, index: int, images_in_row: int) -> _Block:
        ids = [self.vocab.start] + [self.vocab.image] * self.tokens + [self.vocab.end]
        return _Block("image", ids, {"pixels": _randn(gen, 3, self.size, self.size)})

    def collate(self, rows: list[list[_Block]]) -> dict[str, torch.Tensor]:
        images = _of_kind(rows, "image")
        return {"pixel_values": torch.stack([b.payload["pixels"] for b in images])} if images else {}

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (input_ids == self.vocab.image).long()}


# ----------------------------------------------------------------------------------------------
# The case object
# ----------------------------------------------------------------------------------------------


@dataclass
class TinyCase:
    """A tiny model plus a processor-free input builder that knows which ids it inserted."""

    name: str
    model: PreTrainedModel
    image_token_id: int
    video_token_id: int | None
    pad_token_id: int
    special_token_ids: frozenset[int]
    text_id_range: tuple[int, int]
    _spec: _Spec = field(repr=False)

    @property
    def supports_video(self) -> bool:
        return self._spec.supports_video

    @property
    def media_token_ids(self) -> frozenset[int]:
        """Placeholder ids that the model replaces by visual features."""
        ids = {self.image_token_id}
        if self.video_token_id is not None:
            ids.add(self.video_token_id)
        return frozenset(ids)

    def inputs(
        self,
        images_per_row: list[int],
        *,
        text_len: int | list[int] = 6,
        videos_per_row: list[int] | None = None,
        pad_left: bool = True,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Build a batch: row ``b`` holds ``images_per_row[b]`` images then ``videos_per_row[b]``
        videos, between ``text_len // 2`` random text tokens before and the rest after (one random
        text token separates consecutive media). Rows are padded (left by default) with the pad id.
        """
        rows_ids, rows_blocks = self._rows(images_per_row, text_len, videos_per_row, seed)
        return self._assemble(rows_ids, rows_blocks, pad_left)

    def row_inputs(
        self,
        images_per_row: list[int],
        *,
        text_len: int | list[int] = 6,
        videos_per_row: list[int] | None = None,
        seed: int = 0,
    ) -> list[dict[str, torch.Tensor]]:
        """The rows that `inputs` (same arguments) batches, each as its own unpadded batch of one:
        same ids and same pixels, so batched and one-row runs can be compared."""
        rows_ids, rows_blocks = self._rows(images_per_row, text_len, videos_per_row, seed)
        return [self._assemble([ids], [blocks], True) for ids, blocks in zip(rows_ids, rows_blocks, strict=True)]

    def _rows(
        self,
        images_per_row: list[int],
        text_len: int | list[int],
        videos_per_row: list[int] | None,
        seed: int,
    ) -> tuple[list[list[int]], list[list[_Block]]]:
        n_rows = len(images_per_row)
        videos = list(videos_per_row) if videos_per_row is not None else [0] * n_rows
        lens = [text_len] * n_rows if isinstance(text_len, int) else list(text_len)
        if n_rows == 0:
            raise ValueError("need at least one row")
        if len(videos) != n_rows or len(lens) != n_rows:
            raise ValueError("images_per_row, videos_per_row and text_len must have one entry per row")
        if min(lens) < 1:
            raise ValueError("every row needs at least one text token (after its media)")
        if min([*images_per_row, *videos]) < 0:
            raise ValueError("media counts must be >= 0")
        if any(videos) and not self._spec.supports_video:
            raise ValueError(f"{self.name} tiny case does not take videos")

        gen = torch.Generator().manual_seed(seed)
        lo, hi = self.text_id_range

        def text(n: int) -> list[int]:
            return torch.randint(lo, hi, (n,), generator=gen).tolist()

        rows_ids: list[list[int]] = []
        rows_blocks: list[list[_Block]] = []
        n_images = n_videos = 0
        for b in range(n_rows):
            blocks: list[_Block] = []
            for _ in range(images_per_row[b]):
                blocks.append(self._spec.image(gen, n_images, images_per_row[b]))
                n_images += 1
            for _ in range(videos[b]):
                blocks.append(self._spec.video(gen, n_videos))
                n_videos += 1
            pre = lens[b] // 2
            ids = text(pre)
            for k, block in enumerate(blocks):
                if k:
                    ids += text(1)
                ids += block.ids
            ids += text(lens[b] - pre)
            rows_ids.append(ids)
            rows_blocks.append(blocks)
        return rows_ids, rows_blocks

    def _assemble(
        self, rows_ids: list[list[int]], rows_blocks: list[list[_Block]], pad_left: bool
    ) -> dict[str, torch.Tensor]:
        n_rows = len(rows_ids)
        length = max(len(r) for r in rows_ids)
        input_ids = torch.full((n_rows, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(n_rows, length, dtype=torch.long)
        for b, ids in enumerate(rows_ids):
            span = slice(length - len(ids), length) if pad_left else slice(0, len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, span] = 1

        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        out.update(self._spec.token_types(input_ids))
        out.update(self._spec.collate(rows_blocks))
        return out

    def media_mask(self, inputs: dict[str, torch.Tensor] | torch.Tensor, kind: str = "any") -> torch.Tensor:
        """Bool mask of the placeholder tokens this case inserted (``kind``: any, image or video).

        Computed from this module's own id record, not from the library, so tests can use it as
        an independent reference. Wrapper tokens (vision start/end, boi/eoi, ...) are not included.
        """
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        if kind == "any":
            wanted = set(self.media_token_ids)
        elif kind == "image":
            wanted = {self.image_token_id}
        elif kind == "video":
            wanted = {self.video_token_id} if self.video_token_id is not None else set()
        else:
            raise ValueError(f"unknown kind {kind!r}; expected 'any', 'image' or 'video'")
        if not wanted:
            return torch.zeros_like(ids, dtype=torch.bool)
        return torch.isin(ids, torch.tensor(sorted(wanted), dtype=ids.dtype))


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

_Overrides = dict[str, Any]


def _ids_kwargs() -> dict[str, Any]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _lm_kwargs(num_layers: int, vocab: _Vocab) -> dict[str, Any]:
    return {
        "vocab_size": vocab.size,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": _MAX_POS,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": False,
        **_ids_kwargs(),
    }


def _vit_kwargs(image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        "hidden_size": _V_HIDDEN,
        "intermediate_size": _V_INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": _V_HEADS,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _llava(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return LlavaConfig(
        text_config=LlamaConfig(**{**_lm_kwargs(n, v), "head_dim": _HEAD_DIM, **text}),
        vision_config=CLIPVisionConfig(**{**_vit_kwargs(16, 4), "projection_dim": _V_HIDDEN, **vision}),
        **{
            "image_token_index": v.image,
            "image_seq_length": 16,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


def _llava_next(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    vc = CLIPVisionConfig(**{**_vit_kwargs(8, 4), "projection_dim": _V_HIDDEN, **vision})
    t = vc.image_size
    return LlavaNextConfig(
        text_config=LlamaConfig(**{**_lm_kwargs(n, v), "head_dim": _HEAD_DIM, **text}),
        vision_config=vc,
        **{
            "image_token_index": v.image,
            "image_grid_pinpoints": [[t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


def _llava_onevision(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    vc = SiglipVisionConfig(**{**_vit_kwargs(12, 4), "vision_use_head": False, **vision})
    t = vc.image_size
    return LlavaOnevisionConfig(
        text_config=Qwen2Config(**{**_lm_kwargs(n, v), **text}),
        vision_config=vc,
        **{
            "image_token_index": v.image,
            "video_token_index": v.video,
            "image_grid_pinpoints": [[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t]],
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "tie_word_embeddings": False,
            **top,
        },
    )


def _qwen_top(v: _Vocab) -> dict[str, Any]:
    return {
        "image_token_id": v.image,
        "video_token_id": v.video,
        "vision_start_token_id": v.start,
        "vision_end_token_id": v.end,
        "tie_word_embeddings": False,
    }


def _mrope(section: list[int], **extra: Any) -> dict[str, Any]:
    # M-RoPE: the (temporal, height, width) sections split the head_dim/2 rotary frequencies.
    assert sum(section) == _HEAD_DIM // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **extra}


def _qwen2_vl(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(**{**_lm_kwargs(n, v), "rope_parameters": _mrope([2, 3, 3]), **text}),
        vision_config=Qwen2VLVisionConfig(
            **{
                "depth": 1,
                "embed_dim": _V_HIDDEN,
                "hidden_size": _HIDDEN,  # merger output = LM width
                "mlp_ratio": 2,
                "num_heads": _V_HEADS,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                **vision,
            }
        ),
        **{**_qwen_top(v), **top},
    )


def _qwen2_5_vl(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(**{**_lm_kwargs(n, v), "rope_parameters": _mrope([2, 3, 3]), **text}),
        vision_config=Qwen2_5_VLVisionConfig(
            **{
                # two blocks: one windowed (2x2 merged tokens per window), one full attention
                "depth": 2,
                "hidden_size": _V_HIDDEN,
                "intermediate_size": _V_INTERMEDIATE,
                "num_heads": _V_HEADS,
                "out_hidden_size": _HIDDEN,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 16,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,
                **vision,
            }
        ),
        **{**_qwen_top(v), **top},
    )


def _qwen3_vl(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return Qwen3VLConfig(
        text_config=Qwen3VLTextConfig(
            **{
                **_lm_kwargs(n, v),
                "head_dim": _HEAD_DIM,
                "rope_parameters": _mrope([4, 2, 2], mrope_interleaved=True),
                **text,
            }
        ),
        vision_config=Qwen3VLVisionConfig(
            **{
                "depth": 2,
                "hidden_size": _V_HIDDEN,
                "intermediate_size": _V_INTERMEDIATE,
                "num_heads": _V_HEADS,
                "out_hidden_size": _HIDDEN,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 16,  # a 4x4 learned grid, interpolated per image
                # Deepstack: features of these vision blocks are added to the hidden states of the
                # visual tokens after decoder layers 0 and 1.
                "deepstack_visual_indexes": [0, 1],
                **vision,
            }
        ),
        **{**_qwen_top(v), **top},
    )


def _internvl(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return InternVLConfig(
        text_config=Qwen2Config(**{**_lm_kwargs(n, v), **text}),
        vision_config=InternVLVisionConfig(**{**_vit_kwargs(16, 4), **vision}),
        **{
            "image_token_id": v.image,
            "image_seq_length": 4,
            "downsample_ratio": 0.5,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": False,
            **top,
        },
    )


def _idefics3(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    return Idefics3Config(
        text_config=LlamaConfig(**{**_lm_kwargs(n, v), "head_dim": _HEAD_DIM, **text}),
        vision_config=Idefics3VisionConfig(**{**_vit_kwargs(16, 4), **vision}),
        **{"image_token_id": v.image, "scale_factor": 2, "pad_token_id": PAD_ID, "tie_word_embeddings": False, **top},
    )


def _gemma3(n: int, v: _Vocab, text: _Overrides, vision: _Overrides, top: _Overrides) -> PretrainedConfig:
    # sliding, full, sliding, full, ...: the first global layer is layer 1, and the window (8) is
    # shorter than one image (16 tokens).
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return Gemma3Config(
        text_config=Gemma3TextConfig(
            **{
                **_lm_kwargs(n, v),
                "head_dim": _HEAD_DIM,
                "query_pre_attn_scalar": _HEAD_DIM,
                "sliding_window": 8,
                "layer_types": layer_types,
                **text,
            }
        ),
        # 8x8 patches average-pooled 2x2 into 16 tokens per image
        vision_config=SiglipVisionConfig(**{**_vit_kwargs(16, 2), "vision_use_head": False, **vision}),
        **{
            "mm_tokens_per_image": 16,
            "boi_token_index": v.start,
            "eoi_token_index": v.end,
            "image_token_index": v.image,
            "initializer_range": _INIT_STD,
            "tie_word_embeddings": False,
            **top,
        },
    )


_ConfigFn = Callable[[int, _Vocab, _Overrides, _Overrides, _Overrides], PretrainedConfig]

_REGISTRY: dict[str, tuple[_ConfigFn, type[PreTrainedModel], type[_Spec]]] = {
    "llava": (_llava, LlavaForConditionalGeneration, _LlavaSpec),
    "llava_next": (_llava_next, LlavaNextForConditionalGeneration, _LlavaNextSpec),
    "llava_onevision": (_llava_onevision, LlavaOnevisionForConditionalGeneration, _LlavaOnevisionSpec),
    "qwen2_vl": (_qwen2_vl, Qwen2VLForConditionalGeneration, _QwenSpec),
    "qwen2_5_vl": (_qwen2_5_vl, Qwen2_5_VLForConditionalGeneration, _Qwen25Spec),
    "qwen3_vl": (_qwen3_vl, Qwen3VLForConditionalGeneration, _Qwen3Spec),
    "internvl": (_internvl, InternVLForConditionalGeneration, _InternVLSpec),
    "idefics3": (_idefics3, Idefics3ForConditionalGeneration, _Idefics3Spec),
    "gemma3": (_gemma3, Gemma3ForConditionalGeneration, _Gemma3Spec),
}
assert tuple(_REGISTRY) == FAMILIES


def _instantiate(
    cls: type[PreTrainedModel], config: PretrainedConfig, attn_implementation: str, seed: int
) -> PreTrainedModel:
    """Build in float32 on CPU with a private RNG stream (the caller's global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def _randomise_zero_inits(model: PreTrainedModel, seed: int) -> None:
    """Re-draw parameters that transformers initialises to zero but that must not be zero here.

    Gemma 3 zero-initialises its multimodal projection, which would turn every image into the
    same all-zero embedding: the visual tokens would carry no information at all.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, _INIT_STD)


def _make_case(name: str, model: PreTrainedModel, vocab: _Vocab, spec_cls: type[_Spec]) -> TinyCase:
    spec = spec_cls(model.config, vocab)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    # Never *generate* a media/special id: a generated placeholder would look like a visual token
    # to anything that scans input_ids (including the engine under test).
    gc.suppress_tokens = sorted(vocab.specials - {EOS_ID})
    return TinyCase(
        name=name,
        model=model,
        image_token_id=vocab.image,
        video_token_id=vocab.video if spec.supports_video else None,
        pad_token_id=PAD_ID,
        special_token_ids=vocab.specials,
        text_id_range=vocab.text_range,
        _spec=spec,
    )


def build_tiny(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 4,
    **overrides: Any,
) -> TinyCase:
    """Build the tiny model of family `name` (one of `FAMILIES`).

    `overrides` are config kwargs: ``text_config={...}`` and ``vision_config={...}`` are merged into
    the sub-configs, everything else into the top-level config, e.g.
    ``build_tiny("qwen3_vl", vision_config={"deepstack_visual_indexes": [1]})``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    config_fn, cls, spec_cls = _REGISTRY[name]
    top = dict(overrides)
    text = dict(top.pop("text_config", None) or {})
    vision = dict(top.pop("vision_config", None) or {})
    vocab = _Vocab(_VOCAB)
    config = config_fn(num_layers, vocab, text, vision, top)
    model = _instantiate(cls, config, attn_implementation, seed)
    _randomise_zero_inits(model, seed)
    return _make_case(name, model, vocab, spec_cls)


def build_llava_shaped(
    hidden_size: int = 1024,
    num_layers: int = 16,
    image_tokens: int = 576,
    *,
    num_heads: int = 16,
    num_kv_heads: int | None = None,
    intermediate_size: int = 2816,
    vocab_size: int = 4096,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> TinyCase:
    """A LLaVA-1.5-shaped language model (Llama, gated MLP, no GQA by default) behind a deliberately
    tiny CLIP tower whose 14-pixel patches give exactly `image_tokens` tokens per image.

    For benchmarks: decoder cost is realistic for its size while the vision tower costs ~nothing.
    The vocabulary is kept small by default (4096) to save memory; pass 32000 for LLaVA's.
    """
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"image_tokens must be a perfect square, got {image_tokens}")
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    vocab = _Vocab(vocab_size)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max(4096, 2 * image_tokens),
        tie_word_embeddings=False,
        **_ids_kwargs(),
    )
    vision = CLIPVisionConfig(**{**_vit_kwargs(side * 14, 14), "projection_dim": _V_HIDDEN})
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab.image,
        image_seq_length=image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = _instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed)
    return _make_case("llava", model, vocab, _LlavaSpec)
