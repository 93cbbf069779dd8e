"""An independent masked simulation of YOPO, as the public code does it: dense eager attention with hand-built
per-head 4D masks, post-softmax weights, zeroed head outputs, and an FFN whose unused neurons are zeroed.

``simulate(model, ...)`` returns a deep copy of an unpatched model whose attention and MLP forwards are replaced by
dense reference computations. Masks come from the prompt itself, recomputed at every forward (so a no-cache greedy
recomputation works): which positions are visual and where each sits on its image grid are found by walking the
tokens in Python (for tiled and anyres families, with frames cut from the model's own features by
tests/grid_reference.py), not with vtexit's code.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import torch
from grid_reference import hand_places
from torch import nn

from vtexit.core.families import family_for

HAND_PLACED = ("llava_next", "llava_onevision", "internvl", "idefics3", "gemma3")


def hand_grid(model: nn.Module, input_ids: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
    """(media, frame, row, col) per position, by walking each row's tokens."""
    config = model.config
    batch, length = input_ids.shape
    media_ids = {getattr(config, a, None) for a in ("image_token_id", "video_token_id")} - {None}
    media = torch.tensor([[int(t) in media_ids for t in r] for r in input_ids.tolist()], dtype=torch.bool)
    frame = torch.full((batch, length), -1)
    row = torch.zeros(batch, length, dtype=torch.long)
    col = torch.zeros(batch, length, dtype=torch.long)
    if config.model_type in HAND_PLACED:  # frames from the model's own features (tests/grid_reference.py)
        for b, places in enumerate(hand_places(model, inputs, input_ids)):
            labels: dict = {}
            for p, place in enumerate(places):
                media[b, p] = place is not None
                if place is not None:
                    frame[b, p] = labels.setdefault(place[0], len(labels))
                    row[b, p], col[b, p] = place[1], place[2]
        return media, frame, row, col
    if config.model_type not in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return media, frame, row, col  # no grid: only heads / FFN / drop are simulated
    media = torch.zeros(batch, length, dtype=torch.bool)
    if config.model_type == "llava":
        side = math.isqrt(config.image_seq_length)
        for b in range(batch):
            seen = 0
            for p in range(length):
                if int(input_ids[b, p]) == config.image_token_id:
                    media[b, p] = True
                    frame[b, p] = seen // (side * side)
                    row[b, p], col[b, p] = divmod(seen % (side * side), side)
                    seen += 1
        return media, frame, row, col
    merge = config.vision_config.spatial_merge_size
    media = torch.zeros(batch, length, dtype=torch.bool)
    for kind, (token, grid_name) in enumerate(
        ((config.image_token_id, "image_grid_thw"), (config.video_token_id, "video_grid_thw"))
    ):
        grids = [tuple(int(x) for x in g) for g in inputs.get(grid_name, torch.zeros(0, 3)).tolist()]
        item, used = 0, 0
        for b in range(batch):
            count = 0
            for p in range(length):
                if int(input_ids[b, p]) != token:
                    continue
                t, h, w = grids[item]
                fh, fw = h // merge, w // merge
                media[b, p] = True
                # unique per kind, item and frame within the row
                frame[b, p] = 100000 * kind + 1000 * count + used // (fh * fw)
                row[b, p], col[b, p] = divmod(used % (fh * fw), fw)
                used += 1
                if used == t * fh * fw:
                    item, used, count = item + 1, 0, count + 1
    return media, frame, row, col


class _Context:
    """The masks of the forward being run (set by a pre-hook on the copied model)."""

    media: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    valid: torch.Tensor


def simulate(
    model: nn.Module,
    *,
    window: int | None = None,
    active: torch.Tensor | None = None,
    layer_drop: int | None = None,
    neurons: int | None = None,
    pruned_text: str = "renormalise",
) -> nn.Module:
    sim = copy.deepcopy(model)
    context = _Context()

    def set_context(module, args, kwargs):
        ids = kwargs["input_ids"]
        context.media, context.frame, context.row, context.col = hand_grid(sim, ids.cpu(), kwargs)
        mask = kwargs.get("attention_mask")
        context.valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().cpu()

    sim.register_forward_pre_hook(set_context, with_kwargs=True)
    layers = family_for(sim).resolve(sim).layers
    drop = len(layers) if layer_drop is None else layer_drop
    for i, layer in enumerate(layers):
        layer.self_attn.forward = types.MethodType(
            _attention(i, context, window, None if active is None else active[i], i >= drop, pruned_text, i < drop),
            layer.self_attn,
        )
        if neurons is not None and i < drop:
            layer.mlp.forward = types.MethodType(_mlp(context, neurons), layer.mlp)
    return sim


def _allowed(context: _Context, heads: int, window, active, dropped: bool, in_pruned_layer: bool, pruned_text: str):
    """(batch, heads, query, key) bool, and the post-softmax keep of the "zero" mode."""
    media, valid = context.media, context.valid
    length = media.shape[1]
    q = torch.arange(length).view(1, -1, 1)
    k = torch.arange(length).view(1, 1, -1)
    media_q, media_k = media.unsqueeze(2), media.unsqueeze(1)
    base = (k <= q) & valid.unsqueeze(1)
    base = base | ((k == q) & ~valid.unsqueeze(2))  # pad queries: themselves (their outputs are never read)
    allowed = base.unsqueeze(1).expand(-1, heads, -1, -1).clone()
    zero_keep = torch.ones_like(allowed)
    if dropped:  # after the layer drop no query sees a visual key
        allowed &= ~media_k.unsqueeze(1) | ~valid.unsqueeze(2).unsqueeze(1) | media_q.unsqueeze(1) & (k == q)
        return allowed, zero_keep
    if not in_pruned_layer:
        return allowed, zero_keep
    if window is not None:
        radius = (window - 1) // 2
        near = (
            (context.frame.unsqueeze(2) == context.frame.unsqueeze(1))
            & ((context.row.unsqueeze(2) - context.row.unsqueeze(1)).abs() <= radius)
            & ((context.col.unsqueeze(2) - context.col.unsqueeze(1)).abs() <= radius)
            & media_k
        )
        earlier_text = ~media_k & valid.unsqueeze(1) & (k < q)
        visual_rows = (near | earlier_text).unsqueeze(1).expand(-1, heads, -1, -1)
        allowed = torch.where(media_q.unsqueeze(1), visual_rows, allowed)
    if active is not None:
        pruned = ~active.view(1, -1, 1, 1)
        text_q = (~media_q).unsqueeze(1)
        hide = pruned & text_q & media_k.unsqueeze(1)
        if pruned_text == "renormalise":
            allowed &= ~hide
        else:
            zero_keep = ~hide
    return allowed, zero_keep


def _attention(layer_idx, context, window, active, dropped, pruned_text, in_pruned_layer):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query, key = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # Qwen3-VL normalises q and k per head
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotate(query, key, cos, sin)
        heads = query.shape[1]
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        allowed, zero_keep = _allowed(context, heads, window, active, dropped, in_pruned_layer, pruned_text)
        scores = (query @ key.transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        weights = scores.softmax(-1) * zero_keep.to(scores.device)
        out = weights @ value  # (batch, heads, length, head_dim)
        if active is not None and in_pruned_layer:
            silent = context.media.view(batch, 1, length, 1) & ~active.view(1, -1, 1, 1)
            out = out.masked_fill(silent.to(out.device), 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None

    return forward


def _mlp(context, neurons):
    def forward(self, x):
        inner = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        unused = torch.arange(inner.shape[-1]) >= neurons
        zero = context.media.unsqueeze(-1) & unused.view(1, 1, -1)
        return self.down_proj(inner.masked_fill(zero.to(inner.device), 0.0))

    return forward
