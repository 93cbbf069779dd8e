"""Cost records: what each decoder layer really computed, recorded while the model runs.

Reports (FLOPs, evaluation, benchmarks) read these instead of re-deriving a schedule by formula, so every method
(per-row exits, partial keeps, in-layer pruning) is counted from what ran. Counts stay tensors on the model's device
while recording (no host-device sync per layer); they are read on the host only when a report asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class LayerCost:
    """One decoder layer in one forward call, per batch row.

    Queries are split by kind (visual/text); ``keys`` is the number of keys each query row attends to at most (the
    layer's cached keys plus the new ones). ``head_fraction`` and ``ffn_fraction`` are the shares of attention heads
    and FFN neurons that visual query rows used (1.0 unless an in-layer method pruned them). ``visual_keys``, when an
    in-layer method limited the keys of visual queries (windowed attention), is the total over the row's visual
    queries of the keys each attended to in one head; None means every visual query attended to ``keys`` keys.
    """

    visual_queries: torch.Tensor  # (batch,) long
    text_queries: torch.Tensor  # (batch,) long
    keys: torch.Tensor  # (batch,) long
    head_fraction: float = 1.0
    ffn_fraction: float = 1.0
    visual_keys: torch.Tensor | None = None  # (batch,) long

    @property
    def queries(self) -> torch.Tensor:
        return self.visual_queries + self.text_queries


class CostSource(Protocol):
    def layers(self) -> list[LayerCost]: ...


class CallCost:
    """One forward call (a prefill or a decode step): one :class:`LayerCost` per decoder layer.

    The engine records only what it already tracks while the model runs (which layout each layer used); the
    per-layer records are built from ``source`` the first time someone reads ``layers``, so recording costs the
    forward nothing. (An object, not a bound method: a compiled prefill records it too, and Dynamo can rebuild a
    new object after the graph but not a method bound to one.)
    """

    def __init__(self, mode: str, layers: list[LayerCost] | None = None, source: CostSource | None = None):
        self.mode = mode  # "prefill" | "decode"
        self._layers = layers
        self._source = source

    @property
    def layers(self) -> list[LayerCost]:
        if self._layers is None:
            self._layers = self._source.layers() if self._source is not None else []
            self._source = None
        return self._layers

    def __repr__(self) -> str:
        return f"CallCost(mode={self.mode!r}, layers={len(self.layers)})"


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
