"""Keeping a fraction of each row's visual tokens by a score: the step FastV, PyramidDrop and the random baseline
share, and the checks of their settings.

Rules (the same for every method that uses them):

* **How many.** A row with ``V`` visual slots keeps ``round_half_up(keep x V)`` of them, at least one when
  ``V > 0``. ``keep`` is taken as the nearest fraction with a denominator <= 10**6 and the product is computed in
  integers, so ``0.3 x 10`` is exactly 3 (no float surprises) and the result is the same on every device.
* **Which.** The visual slots with the highest scores; equal scores are broken by the lower position (a stable
  sort of the slots, which are in original order).
* Text slots are always kept; pad slots never.

Everything stays on the scores' device: no host-device synchronisation.
"""

from __future__ import annotations

import numbers
from fractions import Fraction

import torch
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.policy import PrefillView
from vtexit.methods.base import check_float, is_bool, shown
from vtexit.methods.vtw.config import valid_layer_range

MAX_DENOMINATOR = 10**6


def check_keep(keep: object, name: str = "keep") -> float:
    """``keep`` as a float, or a ValueError naming it: a real number in (0, 1] (the fraction of visual tokens kept)."""
    return check_float(name, keep, low=0, high=1, low_open=True, what="the fraction of visual tokens kept")


def drop_layer_range(model: nn.Module, family: FamilySpec | None = None) -> tuple[int, int]:
    """(min, max) layer before which a ranked drop may happen: the model's minimum drop layer up to N - 1 (a drop
    before layer N would change nothing)."""
    low, n = valid_layer_range(model, family)
    return low, n - 1


def check_drop_layer(model: nn.Module, layer: object, family: FamilySpec | None = None, name: str = "layer") -> int:
    """Validate a drop layer against the model (ValueError naming the setting), before the model is touched."""
    low, high = drop_layer_range(model, family)
    if is_bool(layer) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"{name} must be an int in [{low}, {high}] for this model, got {shown(layer)}")
    if not low <= layer <= high:
        why = (
            " (layer 0 and the first layer of each attention type, and Qwen3-VL's deepstack layers, must keep the "
            "full sequence)"
            if layer < low
            else f" (the model has {high + 1} decoder layers; a drop before layer {high + 1} would change nothing)"
        )
        raise ValueError(f"{name} must be in [{low}, {high}] for this model, got {shown(int(layer))}{why}")
    return int(layer)


def keep_counts(visual: torch.Tensor, keep: float) -> torch.Tensor:
    """Per row: how many of ``visual`` (batch,) visual slots to keep: round half up of keep x visual, >= 1 if any."""
    fraction = Fraction(keep).limit_denominator(MAX_DENOMINATOR)
    num, den = fraction.numerator, fraction.denominator
    count = torch.div(2 * visual.long() * num + den, 2 * den, rounding_mode="floor")
    return torch.maximum(count, (visual > 0).long())


def top_per_row(scores: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(batch, slots) bool: each row's ``count`` (batch,) allowed slots with the highest ``scores``, equal scores
    to the lower slot (a stable sort)."""
    ranked = scores.float().masked_fill(~allowed, float("-inf"))
    order = ranked.sort(dim=1, descending=True, stable=True).indices
    slots = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, slots)
    return allowed & (rank < count.unsqueeze(1))


def keep_top(view: PrefillView, scores: torch.Tensor, keep: float) -> torch.Tensor:
    """(batch, slots) keep mask: every text slot, plus each row's top ``keep`` share of visual slots by ``scores``
    (batch, slots). See the module docstring for the rounding and tie rules."""
    media = view.media
    return view.text | top_per_row(scores, media, keep_counts(media.sum(dim=1), keep))


def record_kept(view: PrefillView, keep: torch.Tensor) -> None:
    """Note in the call's policy state which original positions each row keeps from this layer on:
    ``state["kept"][layer]`` is a (batch, prompt length) bool mask (``handle.last_policy_state`` after the call)."""
    valid = keep & view.layout.valid
    kept = torch.zeros_like(view.media_original).scatter(1, view.layout.index, valid)
    view.state.setdefault("kept", {})[view.layer_idx] = kept
