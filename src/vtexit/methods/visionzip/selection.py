"""VisionZip's token rule (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv 2412.04467), on one vision-tower layer's outputs, for every image at once:

* **Dominant tokens**: the CLS token and the ``dominant - 1`` patches the CLS token attends to most (attention summed
  over heads), in their original order.
* **Contextual tokens**: of the remaining tokens, every ``remaining // contextual``-th (the first ``contextual`` of
  them) is a target; every other remaining token joins the target whose key (mean over heads) is most cosine-similar,
  and each target becomes the mean of itself and the tokens that joined it.

The result is ``[dominant..., contextual...]`` per image: what the projector then maps into the language model.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cls_attention_and_keys(query: torch.Tensor, keys: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, patches) the CLS token's attention to each patch, summed over heads, and (images, 1 + patches,
    head_dim) the keys, mean over heads, from the layer's CLS query projection ``query`` (images, 1, dim) and key
    projections ``keys`` (images, 1 + patches, dim) of its normed input (softmax in float32)."""
    images, tokens, _ = keys.shape
    query = query.view(images, 1, heads, -1).transpose(1, 2)
    keys = keys.view(images, tokens, heads, -1).transpose(1, 2)  # (images, heads, tokens, head_dim)
    scores = (query.float() @ keys.float().transpose(2, 3)) * keys.shape[-1] ** -0.5
    attention = scores.softmax(dim=-1).sum(dim=1)[:, 0]  # (images, tokens)
    return attention[:, 1:], keys.mean(dim=1)


def dominant_indices(cls_attention: torch.Tensor, dominant: int) -> torch.Tensor:
    """(images, dominant) ascending token indices: 0 (CLS) and the ``dominant - 1`` patches with the highest
    ``cls_attention`` (images, patches)."""
    top = cls_attention.topk(dominant - 1, dim=1).indices + 1
    cls = top.new_zeros(top.shape[0], 1)  # not top[:, :1]: with dominant = 1, top has no column to copy
    return torch.cat([cls, top], dim=1).sort(dim=1).values


def visionzip_tokens(
    features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """(images, dominant + contextual, dim) VisionZip's tokens.

    ``features`` (images, 1 + patches, dim): the layer's output, CLS first; ``cls_attention`` (images, patches): the
    CLS token's attention to each patch; ``keys`` (images, 1 + patches, head_dim): the layer's keys, mean over heads.
    """
    images, tokens, dim = features.shape
    chosen = dominant_indices(cls_attention, dominant)
    kept = features.gather(1, chosen.unsqueeze(-1).expand(-1, -1, dim))
    if contextual == 0:
        return kept
    is_rest = torch.ones(images, tokens, dtype=torch.bool, device=features.device).scatter(1, chosen, False)
    rest = is_rest.nonzero()[:, 1].view(images, tokens - dominant)  # ascending per image
    remaining = rest.shape[1]
    step = max(1, remaining // contextual)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=features.device)
    is_target[torch.arange(0, remaining, step, device=features.device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    unit = F.normalize(keys.float(), dim=-1)
    similarity = _rows(unit, others) @ _rows(unit, targets).transpose(1, 2)  # (images, others, targets)
    joins = F.one_hot(similarity.argmax(dim=2), contextual).float()
    summed = joins.transpose(1, 2) @ _rows(features.float(), others) + _rows(features.float(), targets)
    merged = summed / (1 + joins.sum(dim=1)).unsqueeze(-1)
    return torch.cat([kept, merged.to(features.dtype)], dim=1)


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


# Query rows per block when scoring a whole tower layer: bounds the (heads, rows, tokens) scores a block holds.
SCORE_BLOCK_ELEMENTS = 1 << 26


def attention_received(
    query: torch.Tensor, keys: torch.Tensor, block_elements: int = SCORE_BLOCK_ELEMENTS
) -> torch.Tensor:
    """(..., tokens) the attention each token receives, mean over heads and queries, from per-head ``query`` and
    ``keys`` (..., heads, tokens, head_dim) of one attention (softmax in float32, in blocks of query rows so a large
    image never holds the whole matrix). The dominant-token score of towers without a CLS token."""
    tokens, head_dim = keys.shape[-2:]
    keys_t = keys.float().transpose(-1, -2)
    rows = max(1, block_elements // max(1, keys[..., 0].numel()))
    received = torch.zeros(keys.shape[:-1], dtype=torch.float32, device=keys.device)
    for start in range(0, tokens, rows):
        scores = (query[..., start : start + rows, :].float() @ keys_t) * head_dim**-0.5
        received = received + scores.softmax(dim=-1).sum(dim=-2)
    return received.mean(dim=-2) / tokens


def zip_plan(
    scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip on prompt tokens that stay in place: ``scores`` (rows, tokens) each token's dominance, ``keys``
    (rows, tokens, head_dim). Returns ``kept`` (rows, tokens) bool: the ``dominant`` highest-scoring tokens and the
    ``contextual`` targets; ``targets`` (rows, contextual) their indices; ``weights`` (rows, contextual, tokens): each
    target's merged vector is ``weights @ features`` (the mean of the target and the tokens that joined it)."""
    rows, tokens = scores.shape
    device = scores.device
    kept = torch.zeros(rows, tokens, dtype=torch.bool, device=device)
    kept.scatter_(1, scores.topk(dominant, dim=1).indices, True)
    if contextual == 0:
        return kept, kept.new_zeros(rows, 0, dtype=torch.long), scores.new_zeros(rows, 0, tokens)
    rest = (~kept).nonzero()[:, 1].view(rows, tokens - dominant)  # ascending per row
    remaining = rest.shape[1]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
    is_target[torch.arange(0, remaining, max(1, remaining // contextual), device=device)[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    unit = F.normalize(keys.float(), dim=-1)
    similarity = _rows(unit, others) @ _rows(unit, targets).transpose(1, 2)  # (rows, others, targets)
    members = torch.zeros(rows, contextual, tokens, dtype=torch.float32, device=device)
    members.scatter_(2, targets.unsqueeze(-1), 1.0)
    joins = F.one_hot(similarity.argmax(dim=2), contextual).float().transpose(1, 2)  # (rows, targets, others)
    members.scatter_(2, others.unsqueeze(1).expand(-1, contextual, -1), joins)
    kept.scatter_(1, targets, True)
    return kept, targets, members / members.sum(dim=2, keepdim=True)


def apply_plan(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``features`` (rows, tokens, dim) with each contextual target replaced by its group's mean (see
    :func:`zip_plan`); the other tokens unchanged."""
    if targets.shape[1] == 0:
        return features
    merged = (weights @ features.float()).to(features.dtype)
    return features.scatter(1, targets.unsqueeze(-1).expand(-1, -1, features.shape[-1]), merged)
