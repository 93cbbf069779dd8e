"""DyVTE's schedule: before each gated layer K, every row still holding visual tokens asks its gate whether to
withdraw them there; a row that exits has none from layer K on (in prefill and decode), like VTW at K for it alone.

Host cost. The next layer's shape depends on the decision, so each gated layer reads one scalar on the host (one
device sync): whether any row exits now, and whether any row is still undecided. When a row exits, the engine's
compaction reads one more (the new length). Once every row with visual tokens has exited, later layers run no
gate and read nothing. A prefill therefore costs at most (gated layers up to the last exit) + (exit events) syncs.
"""

from __future__ import annotations

import torch
from torch import nn

from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.dyvte.features import feature_slots, gate_features
from vtexit.methods.dyvte.gates import DyVTEGates

EXIT_LAYERS = "exit_layers"  # view.state key: (batch,) long, the layer each row withdrew at (N = never)


class DyVTEPolicy(Policy):
    """Per-row exits decided by ``gates`` at ``threshold`` (exit when P(exit) > threshold)."""

    def __init__(self, gates: DyVTEGates, threshold: float, num_layers: int):
        self.gates = gates
        self.threshold = threshold
        self.num_layers = num_layers
        self._gated = frozenset(gates.layers)
        self.event_layers = self._gated  # the engine asks only before gated layers

    def modules(self) -> dict[str, nn.Module]:
        return {"gates": self.gates}

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        state = view.state
        if view.layer_idx not in self._gated or state.get("settled"):
            return None
        if EXIT_LAYERS not in state:  # first gated layer of this prefill: nothing has left yet
            state["pending"] = view.media.any(dim=1)  # rows that hold visual tokens and have not exited
            state[EXIT_LAYERS] = torch.full_like(state["pending"], self.num_layers, dtype=torch.long)
        after, last = feature_slots(view.media_original, view.layout)
        with torch.no_grad():
            features = gate_features(view.hidden_states, after, last)
            exits = (self.gates.exit_probability(view.layer_idx, features) > self.threshold) & state["pending"]
        state["pending"] = state["pending"] & ~exits
        state[EXIT_LAYERS] = torch.where(exits, view.layer_idx, state[EXIT_LAYERS])
        # The one host read of this layer: bit 1 = some row exits here, bit 0 = some row is still undecided.
        flags = int(exits.any().to(torch.int8) * 2 + state["pending"].any().to(torch.int8))
        if not flags & 1:
            state["settled"] = True
        if not flags & 2:
            return None
        return view.layout.valid & ~(view.media & exits.unsqueeze(1))


class DyVTEHandle(PatchHandle):
    """Handle of a DyVTE patch; ``exit_layers`` tells where each row of the last prefill withdrew."""

    _snapshot: list[int] | None = None

    @property
    def gates(self) -> DyVTEGates:
        return self.engine.policy.gates

    @property
    def threshold(self) -> float:
        return self.engine.policy.threshold

    @property
    def exit_layers(self) -> list[int] | None:
        """Per row of the last prefill with images in this thread: the layer K before which its visual tokens left
        (N = never, also for rows without images). None before any such prefill or after a call without images.
        After ``remove()`` it still gives the last result seen in this thread."""
        if not self.active:
            return self._snapshot
        if self.last_layout is None:
            return None
        layers = self.last_policy_state.get(EXIT_LAYERS)
        if layers is None:
            return None
        return layers.tolist()

    def remove(self) -> nn.Module:
        self._snapshot = self.exit_layers if self.active else self._snapshot
        return super().remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"DyVTEHandle(gates={self.config.gates!r}, threshold={self.threshold}, "
            f"layers={list(self.gates.layers)}, {state})"
        )
