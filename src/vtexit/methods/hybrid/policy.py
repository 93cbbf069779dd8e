"""A pre-LLM reduction followed by an in-LLM method, as one schedule: the first step's event is before layer 0 (it
shortens the prompt and renumbers positions), the second step's events come after it on what the first kept (VTW
keeps the positions of the shorter prompt, as it would on that prompt). The newest methods (HoliTom, VScan, ToDRE)
are such hybrids."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vtexit.core.layout import Layout
from vtexit.core.policy import Policy, PrefillView


class HybridPolicy(Policy):
    """``pre`` before layer 0, then ``then`` at its own layers."""

    def __init__(self, pre: Policy, then: Policy, num_layers: int):
        if pre.event_layers != frozenset({0}) or not pre.renumbers_at(0):
            raise ValueError(
                "pre must be a method that shortens the prompt before the language model (e.g. divprune), got "
                f"{type(pre).__name__}"
            )
        if type(then).replacements is not Policy.replacements or type(pre).replacements is not Policy.replacements:
            raise ValueError(
                "then must be a schedule method (vtw, dyvte, fastv, pdrop, random_drop), not an in-layer one"
            )
        later = then.event_layers if then.event_layers is not None else frozenset(range(1, num_layers))
        if 0 in later:
            raise ValueError("then must act after the language model's first layer")
        self.pre, self.then = pre, then
        self.event_layers = frozenset({0}) | later
        self.renumber_positions = True  # the engine refuses families whose positions cannot be renumbered
        self.attention_layers = tuple(then.attention_layers)
        self.key_layers = tuple(then.key_layers)  # DART reads keys of the layer before its own

    def renumbers_at(self, layer_idx: int) -> bool:
        return self.pre.renumbers_at(0) if layer_idx == 0 else self.then.renumbers_at(layer_idx)

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        return (self.pre if view.layer_idx == 0 else self.then).keep(view)

    def merge(self, view: PrefillView, keep: torch.Tensor) -> torch.Tensor | None:
        return (self.pre if view.layer_idx == 0 else self.then).merge(view, keep)

    def modules(self) -> dict[str, nn.Module]:
        return {**self.pre.modules(), **self.then.modules()}

    def outer_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        return [*self.pre.outer_hooks(model), *self.then.outer_hooks(model)]

    def prefill_checks(self, media: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {**self.pre.prefill_checks(media, layout), **self.then.prefill_checks(media, layout)}
