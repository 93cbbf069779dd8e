"""Token-id layout shared by every tiny family, so no tokenizer is needed.

In a vocabulary of ``V`` ids:

* ``0`` pad, ``1`` bos, ``2`` eos;
* the top 16 ids are reserved for media/special tokens (image/video placeholders, wrappers,
  Idefics3's row/column tags);
* random text is drawn from ``[3, V - 16)``, so it never collides with a special id.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "RESERVED_TOP_IDS", "TINY_VOCAB_SIZE", "Vocab"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
RESERVED_TOP_IDS = 16
TINY_VOCAB_SIZE = 256


@dataclass(frozen=True)
class Vocab:
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
        return self.size - RESERVED_TOP_IDS + i

    @property
    def text_range(self) -> tuple[int, int]:
        return 3, self.size - RESERVED_TOP_IDS

    @property
    def specials(self) -> frozenset[int]:
        return frozenset({PAD_ID, BOS_ID, EOS_ID, *range(self.size - RESERVED_TOP_IDS, self.size)})
