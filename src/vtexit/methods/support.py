"""Which model families each method accepts: README.md's "Supported families and methods" table, as data.

``vtexit methods`` prints it; tests/test_support.py checks it against what :func:`vtexit.apply` accepts on every tiny
family (:mod:`vtexit.testing.tiny_models`) and against README.md's table. Plain data: importing it loads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# The families by the names of their tiny models (vtexit.testing.tiny_models.FAMILIES), in README's column order.
ALL_FAMILIES = (
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
FAMILY_NAMES = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "internvl": "InternVL",
    "idefics3": "Idefics3 / SmolVLM",
    "gemma3": "Gemma3",
}
ROPE_1D = ("llava", "llava_next", "llava_onevision", "internvl", "idefics3")
RENUMBERING = (
    "renumbering positions after a drop needs 1D rotary positions: the Qwen-VL families use multimodal RoPE, "
    "Gemma3's rotary embedding depends on the layer type"
)


@dataclass(frozen=True)
class Support:
    """One row of the matrix: ``what`` (methods, or one method's setting) is accepted on ``families``; the other
    families refuse it (a ``ValueError`` before the model is touched) for ``why``."""

    what: str
    methods: tuple[str, ...]
    families: tuple[str, ...]
    why: str = ""
    readme: str = ""  # the row's label in README.md's table (default: what)

    def __post_init__(self):
        if not self.readme:
            object.__setattr__(self, "readme", self.what)

    @property
    def refused(self) -> tuple[str, ...]:
        return tuple(f for f in ALL_FAMILIES if f not in self.families)


SUPPORT: tuple[Support, ...] = (
    Support("VTW, DyVTE", ("vtw", "dyvte"), ALL_FAMILIES),
    Support("FastV, PyramidDrop, random drop, DART", ("fastv", "pdrop", "random_drop", "dart"), ALL_FAMILIES),
    Support(
        "PyramidDrop with renumber=True", ("pdrop",), ROPE_1D, RENUMBERING, readme="PyramidDrop with `renumber=True`"
    ),
    Support("DivPrune", ("divprune",), ROPE_1D, f"a reduction before the language model renumbers: {RENUMBERING}"),
    Support(
        "VisionZip",
        ("visionzip",),
        ("llava",),
        "VisionZip reads the CLS token of a CLIP or DINOv2 vision tower in LLaVA-1.5's layout",
    ),
    Support(
        "pooling",
        ("pool",),
        ("llava",),
        "pooling needs the family's visual patch grid, described for LLaVA-1.5's square grid, and 1D rotary positions",
    ),
    Support(
        "YOPO window",
        ("yopo",),
        ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        "the window needs the family's visual patch grid (LLaVA-1.5's square grid, the Qwen-VL grids); "
        "Gemma3's attention (sliding window, logit softcapping) is refused",
        readme="YOPO `window`",
    ),
    Support(
        "YOPO heads",
        ("yopo",),
        ALL_FAMILIES[:-1],
        "pruned heads refuse Gemma3's attention (sliding window, logit softcapping)",
        readme="YOPO `heads`",
    ),
    Support("YOPO ffn_ratio, layer_drop", ("yopo",), ALL_FAMILIES, readme="YOPO `ffn_ratio`, `layer_drop`"),
    Support(
        "hybrid",
        ("hybrid",),
        ROPE_1D,
        "a hybrid runs where its pre-LLM step runs (DivPrune, VisionZip or pooling; the families here: DivPrune's)",
    ),
)


def families_of(method: str) -> list[Support]:
    """The rows of the matrix about ``method`` (the unpatched ``none`` runs everywhere)."""
    if method == "none":
        return [Support("none", ("none",), ALL_FAMILIES)]
    return [row for row in SUPPORT if method in row.methods]


def family_list(families: tuple[str, ...], *, named: bool = False) -> str:
    """``LLaVA-1.5, Qwen2-VL``, or ``every family (9)`` (unless ``named``)."""
    if families == ALL_FAMILIES and not named:
        return f"every family ({len(ALL_FAMILIES)})"
    return ", ".join(FAMILY_NAMES[f] for f in families)
