"""Cost records: what each decoder layer really computed, recorded while the model runs.

Reports (FLOPs, evaluation, benchmarks) read these instead of re-deriving a schedule by formula, so every method
(per-row exits, partial keeps, in-layer pruning) is counted from what ran. Counts stay tensors on the model's device
while recording (no host-device sync per layer); they are read on the host only when a report asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCost:
    """One decoder layer in one forward call, per batch row.

    Queries are split by kind (visual/text); ``keys`` is the number of keys each query row attends to at most (the
    layer's cached keys plus the new ones). ``head_fraction`` and ``ffn_fraction`` are the shares of attention heads
    and FFN neurons that visual query rows used (1.0 unless an in-layer method pruned them).
    """

    visual_queries: torch.Tensor  # (batch,) long
    text_queries: torch.Tensor  # (batch,) long
    keys: torch.Tensor  # (batch,) long
    head_fraction: float = 1.0
    ffn_fraction: float = 1.0

    @property
    def queries(self) -> torch.Tensor:
        return self.visual_queries + self.text_queries


@dataclass
class CallCost:
    """One forward call (a prefill or a decode step): one :class:`LayerCost` per decoder layer."""

    mode: str  # "prefill" | "decode" | "plain" (a call the method did not touch)
    layers: list[LayerCost] = field(default_factory=list)


@dataclass
class RunCost:
    """A prefill and the decode steps that continued its cache, as they ran."""

    prefill: CallCost
    decode: list[CallCost] = field(default_factory=list)

    def tokens_per_layer(self) -> torch.Tensor:
        """(num_layers, batch) prompt tokens each layer processed in the prefill, on the host."""
        return torch.stack([layer.queries for layer in self.prefill.layers]).cpu()


def counts(valid: torch.Tensor, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(visual, text) query counts per row of slots ``valid`` whose media flags are ``media``."""
    visual = (valid & media).sum(dim=1)
    return visual, valid.sum(dim=1) - visual
