"""Which method config each training step runs under: drawn from a user-given distribution, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtexit.methods.base import MethodConfig


@dataclass(frozen=True)
class ConfigSampler:
    """Draws one of ``choices`` per step (``None`` = no method: the plain model), with ``weights`` (uniform if
    omitted). Generic over every registered method, so any MethodConfig (VTW, YOPO, ...) can be tuned for."""

    choices: tuple[MethodConfig | None, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("choices must hold at least one MethodConfig (or None for no method)")
        for choice in self.choices:
            if choice is not None and not isinstance(choice, MethodConfig):
                raise ValueError(f"choices must be MethodConfig instances or None, got {type(choice).__name__}")
        if self.weights is not None:
            if len(self.weights) != len(self.choices):
                raise ValueError(f"weights has {len(self.weights)} entries for {len(self.choices)} choices")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {list(self.weights)}")

    def __call__(self, generator: torch.Generator) -> MethodConfig | None:
        if self.weights is None:
            index = int(torch.randint(len(self.choices), (1,), generator=generator))
        else:
            index = int(torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), 1, generator=generator))
        return self.choices[index]


def vtw_sampler(layers: Sequence[int], *, full: float = 0.0, weights: Sequence[float] | None = None) -> ConfigSampler:
    """VTW with K drawn from ``layers`` (uniformly, or by ``weights``); with probability ``full`` a step runs the
    plain model instead (K = N), so that tuning for early exits does not cost accuracy without withdrawal."""
    from vtexit.methods.vtw import VTWConfig

    layers = list(layers)
    if not layers or any(isinstance(k, bool) or not isinstance(k, int) for k in layers):
        raise ValueError(f"layers must be a non-empty list of ints, got {layers!r}")
    if not 0.0 <= full < 1.0:
        raise ValueError(f"full must be in [0, 1), got {full!r}")
    if weights is not None and len(weights) != len(layers):
        raise ValueError(f"weights has {len(weights)} entries for {len(layers)} layers")
    share = [1.0 / len(layers)] * len(layers) if weights is None else [w / sum(weights) for w in weights]
    choices: list[MethodConfig | None] = [VTWConfig(layer=k) for k in layers]
    probabilities = [(1.0 - full) * s for s in share]
    if full > 0:
        choices.append(None)
        probabilities.append(full)
    return ConfigSampler(tuple(choices), tuple(probabilities))


def parse_layer_spec(text: str) -> list[int]:
    """``"3-10"`` (inclusive range) or ``"4,6,8"`` -> list of K; ValueError naming ``layers`` otherwise."""
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            layers = list(range(low, high + 1))
        else:
            layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"layers must be a range 'a-b' (a <= b) or comma-separated ints, got {text!r}")
    return layers
