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
from vtexit.methods.base import MethodConfig
from vtexit.methods.vtw.config import check_layer
from vtexit.methods.yopo.heads import HeadMask
from vtexit.methods.yopo.policy import InLayerSettings, YOPOPolicy

PRUNED_TEXT = ("renormalise", "zero")
WINDOW_KERNELS = ("auto", "flex", "tiles")  # auto: FlexAttention on CUDA, tiles of SDPA elsewhere


def _as_head_rows(heads: object) -> tuple[tuple[bool, ...], ...] | None:
    """Heads from a HeadMask, a bool tensor, nested lists or a .json/.safetensors path -> nested tuples."""
    if heads is None:
        return None
    if isinstance(heads, (str, Path)):
        heads = HeadMask.load(heads)
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
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1 or self.window % 2 == 0
        ):
            raise ValueError(f"window must be an odd int >= 1 (the neighbourhood side), got {self.window!r}")
        if self.ffn_ratio is not None and (
            isinstance(self.ffn_ratio, bool)
            or not isinstance(self.ffn_ratio, numbers.Real)
            or not float(self.ffn_ratio) >= 1.0
            or float(self.ffn_ratio) == float("inf")
        ):
            raise ValueError(
                f"ffn_ratio must be a finite number >= 1 (visual rows use m / ffn_ratio neurons), "
                f"got {self.ffn_ratio!r}"
            )
        if self.dense_below is not None and (
            isinstance(self.dense_below, bool) or not isinstance(self.dense_below, int) or self.dense_below < 0
        ):
            raise ValueError(f"dense_below must be None or an int >= 0 (visual rows), got {self.dense_below!r}")
        if self.window_kernel not in WINDOW_KERNELS:
            raise ValueError(f"window_kernel must be one of {WINDOW_KERNELS}, got {self.window_kernel!r}")
        if self.pruned_text not in PRUNED_TEXT:
            raise ValueError(f"pruned_text must be one of {PRUNED_TEXT}, got {self.pruned_text!r}")

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
                "(described: LLaVA-1.5 style square grids, Qwen2-VL / Qwen2.5-VL / Qwen3-VL grids)"
            )
        if self.window is not None:
            # The grid function refuses layouts it cannot describe (e.g. LLaVA keeping a CLS token).
            empty = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}
            family.visual_grid(model.config, torch.zeros(1, 1, dtype=torch.bool), empty)
        settings = InLayerSettings(
            self.window, self.head_mask(), self.ffn_ratio, self.pruned_text, self.window_kernel, self.dense_below
        )
        return YOPOPolicy(settings, parts.layers, family, max(1, family.min_layer(model.config)), layer_drop)
