"""Which model families each method accepts, as data: the one support matrix.

README.md's "Supported families and methods" table is generated from it (``python -m vtexit.methods.support``
prints it; ``make matrix`` writes it into the README); ``vtexit methods`` prints it per method; tests/test_support.py
checks it against what :func:`vtexit.apply` accepts on every tiny family (:mod:`vtexit.testing.tiny_models`) and the
README's table against :func:`markdown`. Plain data: importing it loads nothing.
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
ROPE_1D = ("llava", "llava_next", "llava_onevision", "internvl", "idefics3", "gemma3")
RENUMBERING = (
    "renumbering positions after a drop inside the language model needs 1D rotary positions: the Qwen-VL families "
    "use multimodal RoPE (3D positions of the image grid), which has no renumbering"
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
    Support("DivPrune", ("divprune",), ALL_FAMILIES),
    Support("VisionZip", ("visionzip",), ALL_FAMILIES),
    Support("pooling", ("pool",), ALL_FAMILIES),
    Support("YOPO window", ("yopo",), ALL_FAMILIES, readme="YOPO `window`"),
    Support("YOPO heads", ("yopo",), ALL_FAMILIES, readme="YOPO `heads`"),
    Support("YOPO ffn_ratio, layer_drop", ("yopo",), ALL_FAMILIES, readme="YOPO `ffn_ratio`, `layer_drop`"),
    Support(
        "hybrid",
        ("hybrid",),
        ALL_FAMILIES,
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


# README.md holds the generated table between these two lines.
BEGIN_MARK = "<!-- support matrix: generated from vtexit/methods/support.py by `make matrix`; do not edit -->"
END_MARK = "<!-- end of support matrix -->"


def markdown() -> str:
    """The matrix as README.md shows it: a row per method (or setting), a column per family (✓ accepted, ✗ refused
    with a ``ValueError`` before the model is touched), then why each refused cell is refused."""
    lines = [
        "| method | " + " | ".join(FAMILY_NAMES[f] for f in ALL_FAMILIES) + " |",
        "|---" * (len(ALL_FAMILIES) + 1) + "|",
    ]
    for row in SUPPORT:
        if row.methods == ("hybrid",):
            cells = ["where both its steps run"] + [""] * (len(ALL_FAMILIES) - 1)
        else:
            cells = ["✓" if f in row.families else "✗" for f in ALL_FAMILIES]
        lines.append(f"| {row.readme} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in SUPPORT:
        if row.refused and row.methods != ("hybrid",):
            lines.append(f"- {row.readme}, ✗ on {family_list(row.refused, named=True)}: {row.why}.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
