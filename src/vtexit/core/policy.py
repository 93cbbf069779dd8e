"""The contract between a method and the engine: what a policy sees at each layer boundary, and what it may ask.

A method is a :class:`Policy`. During each prefill the engine calls :meth:`Policy.keep` before every decoder layer
with a :class:`PrefillView`; the policy answers which current slots each row keeps (or None: no event here). Rows
decide independently (a row that keeps all of its slots is untouched), a keep may be partial, and there may be
any number of events per prefill. Decode steps follow the prefill's schedule on their own.

Optionally a policy:

* keeps per-call results in ``view.state`` (a dict per prefill; ``handle.last_policy_state`` afterwards);
* reads attention keys: list the layers in ``key_layers`` and read :meth:`PrefillView.keys` later (DART);
* reads attention scores: list the layers in ``attention_layers`` and read :meth:`PrefillView.attention` at any
  later boundary (the last prompt token's attention, recomputed from q/k under SDPA, no eager needed);
* owns modules (gates): return them from :meth:`modules`; the engine moves them to the model's device and dtype;
* renumbers positions after a drop (``renumber_positions``), as PyramidDrop does; VTW keeps original positions;
* replaces attention/MLP forwards (:meth:`replacements`), for in-layer methods; the patch handle restores them;
* merges dropped tokens into kept ones at an event (:meth:`merge`), e.g. pooling;
* declares a schedule known from the prompt alone (``withdraw_media_at``), which compiles without graph breaks;
* hooks modules outside the decoder layers (:meth:`outer_hooks`), e.g. the vision tower (VisionZip);
* asks yes/no questions of the prompt in the prefill's one host read (:meth:`prefill_checks`), e.g. whether YOPO
  runs split or dense, instead of a host read of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vtexit.core.layout import Layout, gather_sequence

if TYPE_CHECKING:
    from vtexit.core.call_access import CallAccess


PREFILL_CHECKS = 4  # checks a policy may add to the prefill's host read (the engine's own take the rest of its 8)


@dataclass
class PrefillView:
    """What a policy may look at when deciding an event before decoder layer ``layer_idx``."""

    layer_idx: int
    layout: Layout
    media_original: torch.Tensor  # (batch, prompt length) bool, True at media (visual) tokens
    hidden_states: torch.Tensor  # (batch, layout.length, hidden), the input of layer_idx
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, prompt length)
    key_states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, prompt length, features)
    # Scratch space of this call for the policy (e.g. the layer each row exited at): one dict per prefill, so
    # concurrent calls never share it. After the call the handle shows it as ``last_policy_state``.
    state: dict = field(default_factory=dict)
    # The core kwargs the family's visual grid is computed from (``input_ids`` and the family's ``grid_inputs``).
    grid_inputs: dict = field(default_factory=dict)

    @property
    def media(self) -> torch.Tensor:
        """Media flags of the current slots."""
        return self.media_original.gather(1, self.layout.index) & self.layout.valid

    @property
    def text(self) -> torch.Tensor:
        """Valid non-media slots."""
        return self.layout.valid & ~self.media

    def attention(self, layer: int) -> torch.Tensor:
        """(batch, layout.length) attention the last prompt token gave each current slot at ``layer`` (mean over
        heads); 0 on pad slots. ``layer`` must be listed in the policy's ``attention_layers`` and be < layer_idx."""
        if layer not in self.scores:
            raise ValueError(
                f"attention at layer {layer} was not recorded: list it in the policy's attention_layers "
                f"(and read it at a later layer boundary than {layer})"
            )
        return self.scores[layer].gather(1, self.layout.index) * self.layout.valid

    def keys(self, layer: int) -> torch.Tensor:
        """(batch, layout.length, kv heads x head_dim) the attention keys (rotary applied) layer ``layer`` computed
        for each current slot; 0 on pad slots. ``layer`` must be in the policy's ``key_layers`` and < layer_idx."""
        if layer not in self.key_states:
            raise ValueError(
                f"keys of layer {layer} were not recorded: list it in the policy's key_layers "
                f"(and read them at a later layer boundary than {layer})"
            )
        keys = self.key_states[layer]
        return gather_sequence(keys, self.layout.index, 1) * self.layout.valid.unsqueeze(-1).to(keys.dtype)


class Policy:
    """Base class of a method's decision logic. Override :meth:`keep`; the rest is optional."""

    attention_layers: tuple[int, ...] = ()
    key_layers: tuple[int, ...] = ()  # layers whose attention keys the policy reads (PrefillView.keys)
    renumber_positions: bool = False
    # The layers before which keep() may return a mask; None asks at every layer from the family's minimum layer on
    # (layer 0, and for some families a few more, must keep the full sequence). Layers before the first event layer
    # get no hook at all, so naming them makes the patch cheaper.
    event_layers: frozenset[int] | None = None
    # A schedule known from the prompt alone: every media slot leaves before this layer and nothing else changes
    # (VTW). The engine then plans the prefill's layout before the first layer instead of asking keep(), so a
    # compiled prefill runs with shapes the compiler knows (no graph break). None: ask keep() at each layer.
    withdraw_media_at: int | None = None

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        """(batch, layout.length) bool: the slots each row keeps before ``view.layer_idx``; None for no event."""
        return None

    def renumbers_at(self, layer_idx: int) -> bool:
        """Whether the event before ``layer_idx`` renumbers positions (default: ``renumber_positions``). A policy
        that chains steps (a pre-LLM reduction, then VTW) renumbers at some events and not at others."""
        return self.renumber_positions

    def merge(self, view: PrefillView, keep: torch.Tensor) -> torch.Tensor | None:
        """Hidden states (batch, layout.length, hidden) the kept slots carry on from an event, when they are not
        ``view.hidden_states`` (a method that merges dropped tokens into kept ones, e.g. pooling); None: unchanged."""
        return None

    def modules(self) -> dict[str, nn.Module]:
        """Modules the method owns (e.g. gates); they follow the model's device and dtype."""
        return {}

    def outer_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Register hooks on modules outside the decoder layers (e.g. the vision tower) and return their handles; the
        patch removes them with its own. Called once, after every refusal, when the patch attaches."""
        return []

    def prefill_checks(self, media: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        """Named 0-dim bool tensors about a prefill with media (``media`` (batch, length) bool, its full ``layout``)
        that the engine reads with the prefill's one host read (at most ``PREFILL_CHECKS`` of them); their values are
        ``engine.prefill_check(name)`` during the call. Tensor ops only."""
        return {}

    def replacements(self, engine: CallAccess) -> dict[nn.Module, Callable]:
        """Replacement forwards ``{module: forward(module, *args, **kwargs)}`` for in-layer methods.

        ``engine.parts.layers`` are the decoder layers; inside a forward, ``engine.current_media()`` gives the media
        flags of the slots being computed and ``engine.record_fraction`` records what was skipped."""
        return {}
