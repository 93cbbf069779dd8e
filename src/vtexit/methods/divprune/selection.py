"""DivPrune's selection rule (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025): keep the subset of visual tokens that is most diverse, as a max-min diversity problem solved
greedily on the cosine distances of their features.

* The first token is the most isolated one: the largest distance to its nearest other candidate.
* Each next token is the candidate farthest from everything kept so far (the largest minimum distance to the kept
  set). Ties go to the lower position.

Batched: every row runs the same steps on the device, each with its own candidates and count; the number of steps is
the largest count (one host read per call).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(batch, n, n) ``1 - cos(x_i, x_j)`` of ``features`` (batch, n, dim), in float32."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_diverse(features: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(batch, n) bool: for each row, ``count[b]`` of its ``candidates`` chosen by the greedy max-min rule above.

    ``features`` (batch, n, dim); ``candidates`` (batch, n) bool; ``count`` (batch,) long, at most the row's
    candidates. Each step is a few kernels (a GPU runs one step per kept token): rows past their count keep picking,
    and those picks are discarded at the end."""
    batch, n = candidates.shape
    distance = cosine_distances(features)
    far = torch.finfo(distance.dtype).max
    others = candidates.unsqueeze(1) & ~torch.eye(n, dtype=torch.bool, device=candidates.device)
    nearest = distance.masked_fill(~others, far).amin(dim=2)  # a lone candidate is "far" from everything
    blocked = torch.zeros_like(nearest).masked_fill(~candidates, float("-inf"))  # -inf: not (or no longer) pickable
    steps = int(count.max()) if batch else 0
    picks = [torch.zeros(batch, 0, dtype=torch.long, device=candidates.device)]
    to_selected = torch.full_like(nearest, far)
    for step in range(steps):
        pick = ((nearest if step == 0 else to_selected) + blocked).argmax(dim=1, keepdim=True)  # first of equal maxima
        blocked.scatter_(1, pick, float("-inf"))
        picks.append(pick)
        to_selected = torch.minimum(to_selected, distance.gather(1, pick.unsqueeze(-1).expand(-1, 1, n)).squeeze(1))
    taken = (torch.arange(steps, device=candidates.device) < count.unsqueeze(1)).float()
    return torch.zeros(batch, n, device=candidates.device).scatter_add_(1, torch.cat(picks, dim=1), taken) > 0
