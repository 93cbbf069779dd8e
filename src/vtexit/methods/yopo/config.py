"""YOPO's settings: four optional strategies, checked against the model before anything is patched."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_choice, check_float, check_int, is_bool, shown
from vtexit.methods.vtw.config import check_layer, check_layer_index
from vtexit.methods.yopo.heads import HeadMask
from vtexit.methods.yopo.policy import InLayerSettings, YOPOPolicy

PRUNED_TEXT = ("renormalise", "zero")
WINDOW_KERNELS = ("auto", "flex", "tiles")  # auto: FlexAttention on CUDA, tiles of SDPA elsewhere
STRATEGIES = ("window", "heads", "layer_drop", "ffn_ratio")
MAX_WINDOW = 2**31 - 1  # wider than any grid: the whole image
MAX_DENSE_BELOW = 2**62  # more visual rows than any prefill holds: always dense


def _as_head_rows(heads: object) -> tuple[tuple[bool, ...], ...] | None:
    """Heads from a HeadMask, a bool tensor, nested lists or a .json/.safetensors path -> nested tuples."""
    if heads is None:
        return None
    if isinstance(heads, (str, Path)):
        try:
            heads = HeadMask.load(heads)
        except (ValueError, OSError) as err:
            raise ValueError(f"heads: {err}") from None
    if isinstance(heads, HeadMask):
        heads = heads.active
    try:
        mask = torch.as_tensor(heads)
    except (TypeError, ValueError, RuntimeError):
        mask = None
    if mask is None or mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(
            "heads must be a (layers, heads) bool mask: a HeadMask from vtexit.calibrate_heads, a bool tensor, "
            "nested lists of bools, or a .json/.safetensors file saved by HeadMask.save"
        )
    return tuple(tuple(row) for row in mask.tolist())


@dataclass(frozen=True)
class YOPOConfig(MethodConfig):
    """YOPO-style pruning of visual computation (arXiv 2410.06169); each strategy is optional.

    ``window``: odd w; a visual query attends to the visual keys of its w x w neighbourhood on its image's grid
    and every earlier text key (prefill). ``heads``: (layers, heads) mask of heads active for visual query rows
    (:func:`vtexit.calibrate_heads`); in pruned heads text queries see no visual key (``pruned_text="renormalise"``)
    or weight them 0 after the softmax as the public simulation does (``"zero"``). ``layer_drop``: withdraw every
    visual token before this layer (VTW). ``ffn_ratio``: visual rows use the first m / r FFN neurons.
    ``window_kernel``: the window's kernel, ``"flex"`` (one compiled FlexAttention call per layer with a block mask
    built once per prefill), ``"tiles"`` (SDPA over tiles of the grid) or ``"auto"`` (flex on CUDA, else tiles).
    ``dense_below``: a prefill with fewer visual rows (batch x widest row) runs window / heads / FFN densely, the
    rules as masks (the same function, nothing saved; :mod:`vtexit.methods.yopo.execution`); None: 2048 on CUDA,
    0 (always split) elsewhere.
    """

    method: ClassVar[str] = "yopo"
    window: int | None = None
    heads: tuple | str | None = None
    layer_drop: int | None = None
    ffn_ratio: float | None = None
    pruned_text: str = "renormalise"
    window_kernel: str = "auto"
    dense_below: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "heads", _as_head_rows(self.heads))
        window = self.window
        if window is not None:
            odd = not is_bool(window) and isinstance(window, numbers.Integral) and window % 2 == 1
            if not odd or not 1 <= window <= MAX_WINDOW:
                raise ValueError(
                    f"window must be None or an odd int in [1, 2**31) (the neighbourhood side), got {shown(window)}"
                )
            object.__setattr__(self, "window", int(window))
        object.__setattr__(self, "layer_drop", check_layer_index("layer_drop", self.layer_drop, optional=True))
        ratio = self.ffn_ratio
        ratio = check_float("ffn_ratio", ratio, low=1, what="visual rows use m / ffn_ratio neurons", optional=True)
        object.__setattr__(self, "ffn_ratio", ratio)
        dense_below = check_int(
            "dense_below",
            self.dense_below,
            low=0,
            high=MAX_DENSE_BELOW,
            bounds="in [0, 2**62]",
            what="visual rows",
            optional=True,
        )
        object.__setattr__(self, "dense_below", dense_below)
        check_choice("window_kernel", self.window_kernel, WINDOW_KERNELS)
        check_choice("pruned_text", self.pruned_text, PRUNED_TEXT)
        if all(getattr(self, name) is None for name in STRATEGIES):
            raise ValueError(
                "yopo needs at least one strategy, or it prunes nothing: set window, heads, layer_drop or ffn_ratio"
            )

    def head_mask(self) -> HeadMask | None:
        return None if self.heads is None else HeadMask(torch.tensor(self.heads, dtype=torch.bool))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        parts = family.resolve(model)
        text = model.config.get_text_config()
        num_layers = len(parts.layers)
        layer_drop = None if self.layer_drop is None else check_layer(model, self.layer_drop, family, name="layer_drop")
        if self.heads is not None:
            shape = (len(self.heads), len(self.heads[0]) if self.heads else 0)
            if shape != (num_layers, text.num_attention_heads):
                raise ValueError(
                    f"heads is a {shape[0]} x {shape[1]} mask; this model has {num_layers} layers x "
                    f"{text.num_attention_heads} heads"
                )
        if self.window is not None and family.visual_grid is None:
            raise ValueError(
                f"window needs the visual patch grid, which family {family.name!r} does not describe "
                "(described: every built-in family; pass a FamilySpec with visual_grid=... for this one)"
            )
        if self.window is not None:
            # The grid function refuses layouts it cannot describe (e.g. LLaVA keeping a CLS token).
            empty = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
            family.visual_grid(model.config, torch.zeros(1, 1, dtype=torch.bool), empty)
        settings = InLayerSettings(
            self.window, self.head_mask(), self.ffn_ratio, self.pruned_text, self.window_kernel, self.dense_below
        )
        return YOPOPolicy(settings, parts.layers, family, max(1, family.min_layer(model.config)), layer_drop)
