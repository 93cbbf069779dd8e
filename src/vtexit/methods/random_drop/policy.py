"""A uniform random drop: before layer K each row keeps a random share R of its visual tokens (a strong baseline in
recent token-pruning benchmarks).

The draw is seeded and stateless: the i-th visual token of every row gets the i-th value of one uniform sequence
drawn from ``torch.Generator().manual_seed(seed)`` (in blocks of 4096, each block from its own generator, so the
values of the first tokens never depend on how many there are), and the row keeps its tokens with the highest
values. A row's kept set therefore depends only on the seed and its number of visual tokens: not on the batch it
is in, its padding or the other rows, and it is the same on every call. Over seeds each row keeps a uniformly
random subset of the right size; for one seed, rows with the same number of visual tokens keep the same ordinals
(use several seeds to average over masks). Counts and ties: :mod:`vtexit.methods.fastv.ranking`.

The values are drawn on the CPU from shapes alone (no host-device sync) and moved to the data's device once per
device (again only for a longer sequence), then reused.
"""

from __future__ import annotations

import threading

import torch

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.fastv.ranking import keep_top, record_kept

BLOCK = 4096


def uniform_values(seed: int, length: int) -> torch.Tensor:
    """The first ``length`` values of the seed's uniform sequence (float32, CPU); a prefix of any longer draw."""
    blocks = []
    for block in range(-(-length // BLOCK)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        blocks.append(torch.rand(BLOCK, generator=generator))
    return torch.cat(blocks)[:length] if blocks else torch.zeros(0)


class RandomDropPolicy(Policy):
    """A seeded uniform partial drop of visual tokens before ``layer``."""

    def __init__(self, layer: int, keep: float, seed: int):
        self.layer = layer
        self.fraction = keep
        self.seed = seed
        self.event_layers = frozenset({layer})
        self._values: dict[torch.device, torch.Tensor] = {}  # the longest draw so far, per device
        self._lock = threading.Lock()

    def _draw(self, device: torch.device, length: int) -> torch.Tensor:
        with self._lock:
            values = self._values.get(device)
            if values is None or values.shape[0] < length:
                values = uniform_values(self.seed, -(-length // BLOCK) * BLOCK).to(device)
                self._values[device] = values
        return values[:length]

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer:
            return None
        media = view.media
        ordinal = (media.long().cumsum(dim=1) - 1).clamp_min(0)  # i-th visual token of its row
        scores = self._draw(media.device, view.layout.length)[ordinal]
        mask = keep_top(view, scores, self.fraction)
        record_kept(view, mask)
        return mask
