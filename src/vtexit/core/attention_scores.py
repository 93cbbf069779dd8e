"""The attention that chosen query rows give to every key of a layer, without eager attention.

Methods such as FastV rank visual tokens by the attention the last prompt token gives them. Under SDPA (or flash)
no attention probabilities are ever materialised, and ``output_attentions`` forces eager attention for the whole
model. Instead we recompute, for the few query rows asked for, ``softmax(q k^T * scale + mask)`` from the inputs
the attention module receives: its own projections, q/k norms, the family's own rotary function, the layer's mask,
grouped-query heads expanded. Cost: one small matmul per requested layer.
"""

from __future__ import annotations

import torch
from torch import nn

from vtexit.core.transformers_compat import rotary_function


def _rotary_function(attention: nn.Module):
    rotate = rotary_function(attention)
    if rotate is None:
        raise ValueError(
            f"{type(attention).__name__} has no apply_rotary_pos_emb in its modeling module; vtexit cannot compute "
            "attention scores for this family"
        )
    return rotate


def check_supported(attention: nn.Module) -> None:
    """Refuse, before patching, an attention module whose scores cannot be recomputed."""
    missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
    if missing:
        raise ValueError(
            f"{type(attention).__name__} lacks {missing}; vtexit computes attention scores only for attention "
            "modules with q_proj/k_proj projections (Llama-style)"
        )
    _rotary_function(attention)


def _heads(projection: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    batch, length, _ = projection.shape
    states = projection.view(batch, length, -1, head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)  # (batch, heads, length, head_dim)


def rotated_keys(
    attention: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """(batch, kv heads, length, head_dim) keys of ``attention`` for its input ``hidden_states`` (after the layer's
    input norm): projection, the family's k norm if any, rotary, as the module computes them."""
    rotate = _rotary_function(attention)
    key = _heads(attention.k_proj(hidden_states), attention.head_dim, getattr(attention, "k_norm", None))
    cos, sin = position_embeddings
    key, _ = rotate(key, key, cos, sin)
    return key


def query_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    query_slots: torch.Tensor,
    mean_heads: bool = True,
) -> torch.Tensor:
    """Mean-over-heads attention probabilities (batch, queries, keys) of the slots ``query_slots`` (batch, queries);
    per head (batch, heads, queries, keys) with ``mean_heads=False``.

    ``hidden_states`` is the attention module's input (after the layer's input norm) for a prefill with an empty
    cache, so keys are the same slots as queries. ``attention_mask`` is what the layer passes to its attention:
    None (plain causal), a boolean mask (True = attend) or an additive float mask.
    """
    rotate = _rotary_function(attention)
    head_dim = attention.head_dim
    batch, length, _ = hidden_states.shape
    picked = hidden_states.gather(1, query_slots.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
    query = _heads(attention.q_proj(picked), head_dim, getattr(attention, "q_norm", None))
    key = rotated_keys(attention, hidden_states, position_embeddings)
    cos, sin = position_embeddings
    cos_q = cos.expand(batch, -1, -1).gather(1, query_slots.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
    sin_q = sin.expand(batch, -1, -1).gather(1, query_slots.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    query, _ = rotate(query, query, cos_q, sin_q)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attention.scaling
    cap = getattr(attention, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if attention_mask is None:
        keys = torch.arange(length, device=scores.device)
        allowed = (keys.view(1, 1, -1) <= query_slots.unsqueeze(-1)).unsqueeze(1)
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        rows = attention_mask[..., :length].expand(batch, -1, -1, -1)  # an empty cache: keys are the first slots
        rows = rows.gather(2, query_slots.view(batch, 1, -1, 1).expand(-1, rows.shape[1], -1, length))
        if rows.dtype == torch.bool:
            scores = scores.masked_fill(~rows, float("-inf"))
        else:
            scores = scores + rows.float()
    probs = scores.softmax(dim=-1)
    return probs.mean(dim=1) if mean_heads else probs
