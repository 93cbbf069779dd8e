"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494): before an early layer K, keep the visual tokens least duplicated with a few pivot tokens. No
attention map is needed, so SDPA and FlashAttention stay on.

The rule, as DART's released code has it: pivots are the ``pivots_visual`` visual tokens and the ``pivots_text``
text tokens after the image whose keys at layer K-1 (all heads, rotary applied) have the largest L1 norm. Each pivot
in turn takes the ``budget // (pivots_visual + pivots_text)`` remaining visual tokens least similar to it (cosine
of the layer-K inputs after the language model's final norm), which leave the pool; the row keeps its visual pivots
and everything the pivots took, with original positions. Here pivots take turns in position order (DART iterates a
Python set), a row's text pivots come after its last visual token, ties go to the lower position, and the budget is
FastV's count of the kept fraction ``keep``. Pivot counts are clipped per row: a row with fewer visual tokens than
``pivots_visual`` (or fewer text tokens after its last visual token than ``pivots_text``) takes all of them as pivots
(so it keeps all its visual tokens when ``pivots_visual`` is at least their number); the per-pivot share still
divides the budget by ``pivots_visual + pivots_text``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.fastv.ranking import keep_counts, record_kept, top_per_row


class DARTPolicy(Policy):
    def __init__(self, layer: int, keep: float, pivots_visual: int, pivots_text: int, norm: nn.Module):
        self.layer, self.fraction = layer, keep
        self.pivots_visual, self.pivots_text = pivots_visual, pivots_text
        self.event_layers = frozenset({layer})
        self.key_layers = (layer - 1,)
        self.norm = norm  # the language model's final norm (DART compares normed hidden states)

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer:
            return None
        media, text = view.media, view.text
        batch, length = media.shape
        slots = torch.arange(length, device=media.device).expand(batch, length)
        last_visual = torch.where(media, slots, -1).amax(dim=1, keepdim=True)
        strength = view.keys(self.layer - 1).float().abs().sum(-1)
        pivots_visual = top_per_row(strength, media, torch.full((batch,), self.pivots_visual, device=media.device))
        after = text & (slots > last_visual)
        pivots_text = top_per_row(strength, after, torch.full((batch,), self.pivots_text, device=media.device))
        pivots = pivots_visual | pivots_text
        per_pivot = keep_counts(media.sum(1), self.fraction) // (self.pivots_visual + self.pivots_text)
        unit = F.normalize(self.norm(view.hidden_states).float(), dim=-1)
        # Pivot slots in position order, one column per turn (rows with fewer pivots skip the missing turns).
        order = torch.where(pivots, slots, length).sort(dim=1).values
        pool = media & ~pivots_visual
        for turn in range(min(self.pivots_visual + self.pivots_text, length)):  # a row has at most length pivots
            pivot = order[:, turn]
            present = pivot < length
            anchor = unit.gather(1, pivot.clamp(max=length - 1).view(batch, 1, 1).expand(-1, 1, unit.shape[-1]))
            similarity = (unit * anchor).sum(-1)
            taken = top_per_row(-similarity, pool, torch.where(present, per_pivot, 0))
            pool = pool & ~taken
        kept = text | (media & ~pool)  # the visual pivots never were in the pool
        record_kept(view, kept)
        return kept
