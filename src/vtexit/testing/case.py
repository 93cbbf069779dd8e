"""`TinyCase`: a tiny model plus the tokenizer-free batch builder that goes with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from vtexit.testing.input_spec import InputSpec, MediaBlock

__all__ = ["TinyCase"]


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
    _spec: InputSpec = field(repr=False)

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
    ) -> tuple[list[list[int]], list[list[MediaBlock]]]:
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
        rows_blocks: list[list[MediaBlock]] = []
        n_images = n_videos = 0
        for b in range(n_rows):
            blocks: list[MediaBlock] = []
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
        self, rows_ids: list[list[int]], rows_blocks: list[list[MediaBlock]], pad_left: bool
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

        Computed from this case's own id record, not from the library, so tests can use it as
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
