"""One module per tiny family (its config builder and input builder side by side).

`TINY_FAMILIES` below is the one place that lists them; `FAMILIES` and the lookup derive from it.
"""

from __future__ import annotations

from vtexit.testing.families import (
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)
from vtexit.testing.family import TinyFamily

__all__ = ["FAMILIES", "TINY_FAMILIES", "family_by_name"]

TINY_FAMILIES: tuple[TinyFamily, ...] = (
    llava.FAMILY,
    llava_next.FAMILY,
    llava_onevision.FAMILY,
    qwen2_vl.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    internvl.FAMILY,
    idefics3.FAMILY,
    gemma3.FAMILY,
)
FAMILIES: tuple[str, ...] = tuple(f.name for f in TINY_FAMILIES)


def family_by_name(name: str) -> TinyFamily:
    for family in TINY_FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
