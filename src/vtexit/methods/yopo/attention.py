"""YOPO's attention forward: visual query rows computed apart from text rows, so pruning is compute not done.

In a prefill with visual tokens, one decoder layer's attention runs as
  * keys and values of every slot, as the model would (they go to the cache);
  * text query rows in every head, over the keys the model's mask allows (causal; a sliding layer's window, see
    :mod:`vtexit.methods.yopo.model_mask`); in a head pruned for visual tokens the
    visual keys are invisible (``pruned_text="renormalise"``: softmax over the other keys) or, as in the public
    simulation, weighted 0 after the softmax (``"zero"``: the weights no longer sum to 1);
  * visual query rows only in the heads active for visual tokens (q/o projections sliced to those heads): over the
    keys the model's mask allows (causal; on Gemma3 also the rest of their own image, and the sliding window), or
    under ``window`` over the visual keys of their w x w neighbourhood on their image's grid (gathered, never a dense
    masked matrix) plus every earlier text key, cut to the model's mask.
Decode steps and continued text are text queries: heads pruned for visual tokens see the cached visual keys the
same way (a sliding layer's cache holds the last keys); the window is a prefill-only rule. Outside a patched call
the module's own forward runs.
Everything but the per-call index tensors is computed without a host read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from vtexit.core.call_access import CallAccess
from vtexit.core.compiled import eager_under_compile
from vtexit.core.transformers_compat import (
    attention_is_causal,
    attention_sliding_window,
    attention_softcap,
    rotary_function,
    take_cache,
    with_cache,
)
from vtexit.methods.yopo import sliced
from vtexit.methods.yopo.dense import DenseHeadMasks, additive_mask, without_visual_keys
from vtexit.methods.yopo.execution import runs_split
from vtexit.methods.yopo.flex_window import FlexWindow, compiled_flex_attention, flex_window, flex_window_attention
from vtexit.methods.yopo.model_mask import dense_model_mask, restrict_tiles, rows_mask
from vtexit.methods.yopo.rows import QueryRows, RowBlock, call_rows
from vtexit.methods.yopo.window import Tiles, tiled_attention, tiles


@dataclass(frozen=True)
class HeadPlan:
    """The heads of one layer that visual query rows compute, and the key/value head each reads."""

    active: torch.Tensor  # (heads,) bool
    active_index: torch.Tensor  # (active,) long
    kv_index: torch.Tensor  # (active,) long
    pruned: bool  # some head is pruned
    every_kv_head: bool  # kv_index is every key/value head in order (nothing pruned, no grouped heads): no gather
    copies: dict = field(default_factory=dict, compare=False)  # device -> this plan there

    @classmethod
    def of(cls, active: torch.Tensor, kv_heads: int) -> HeadPlan:
        heads = active.numel()
        index = active.nonzero().flatten()
        pruned = bool((~active).any())
        return cls(active, index, index // (heads // kv_heads), pruned, not pruned and heads == kv_heads)

    def on(self, device: torch.device) -> HeadPlan:
        """This plan with its tensors on ``device`` (copied once per device, not per call)."""
        if self.active.device == device:
            return self
        if device not in self.copies:
            moved = (t.to(device) for t in (self.active, self.active_index, self.kv_index))
            self.copies[device] = HeadPlan(*moved, self.pruned, self.every_kv_head)
        return self.copies[device]


def check_attention(module: nn.Module, what: str) -> None:
    """Refuse an attention module this forward cannot stand in for (ValueError naming ``what`` needs it)."""
    missing = [
        n
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
        if not hasattr(module, n)
    ]
    if missing:
        raise ValueError(f"{what} needs Llama-style attention; {type(module).__name__} lacks {missing}")
    # Sliding windows and Gemma3's bidirectional image blocks are part of the masks (model_mask); softcapping is not.
    if attention_softcap(module) is not None:
        raise ValueError(
            f"{what} does not support {type(module).__name__} with attn_logit_softcapping set "
            f"({attention_softcap(module)}): YOPO's attention does not cap logits; unset it in the text config"
        )
    if not attention_is_causal(module):
        raise ValueError(f"{what} does not support {type(module).__name__} with bidirectional text attention")
    if rotary_function(module) is None:
        raise ValueError(f"{what}: {type(module).__name__}'s module has no apply_rotary_pos_emb")


class YOPOAttention:
    """Replacement forwards for the attention modules of one patched model (one instance per patch)."""

    def __init__(
        self,
        engine: CallAccess,
        plans: dict[int, HeadPlan],
        window: int | None,
        pruned_text: str,
        window_kernel: str = "auto",
        dense_below: int | None = None,
    ):
        self.engine = engine
        self.plans = plans
        self.window = window
        self.pruned_text = pruned_text
        self.window_kernel = window_kernel
        self.dense_below = dense_below
        self._flex_kernels: dict[str, object] = {}  # device type -> FlexAttention compiled for it, on first use

    # ------------------------------------------------------------------------------------------- entry
    @eager_under_compile
    def forward(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        # The cache arrives as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier): both are taken, or
        # the layer would silently skip its KV writes.
        cache = take_cache(kwargs)
        mode = self.engine.call_mode()
        plan = self.plans[module.layer_idx].on(hidden_states.device)
        if mode == "prefill":
            if not runs_split(self.engine, hidden_states.device, self.dense_below):
                return self._dense(module, plan, hidden_states, position_embeddings, cache), None
            return self._prefill(module, plan, hidden_states, position_embeddings, cache), None
        if mode == "decode" and plan.pruned:
            return self._text_only(module, plan, hidden_states, position_embeddings, attention_mask, cache), None
        return type(module).forward(
            module,
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **with_cache(kwargs, module, cache),
        )

    # ------------------------------------------------------------------------------------------- pieces
    @staticmethod
    def _rotate(module: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The family's function rotates a (query, key) pair and only the first result is needed: the second argument
        # is one head of ``states`` (passing ``states`` twice rotated the whole block twice).
        return rotary_function(module)(states, states[:, :1], cos, sin)[0]

    @staticmethod
    def _heads(module: nn.Module, projected: torch.Tensor, norm_name: str | None = None) -> torch.Tensor:
        batch, length, _ = projected.shape
        states = projected.view(batch, length, -1, module.head_dim)
        norm = None if norm_name is None else getattr(module, norm_name, None)
        if norm is not None:
            states = norm(states)
        return states.transpose(1, 2)

    def _keys_values(self, module, hidden, cos, sin, cache):
        key = self._rotate(module, self._heads(module, module.k_proj(hidden), "k_norm"), cos, sin)
        value = self._heads(module, module.v_proj(hidden))
        if cache is not None:
            key, value = cache.update(key, value, module.layer_idx)
        return key, value

    def _attend(self, query, key, value, allowed, plan: HeadPlan, key_media, scale):
        """Text-query attention; in heads pruned for visual tokens, visual keys are invisible or zero-weighted."""
        if not plan.pruned:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True)
        visible = plan.active.view(1, -1, 1, 1) | ~key_media.view(key_media.shape[0], 1, 1, -1)
        if self.pruned_text == "renormalise":
            allowed = allowed & visible
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query with nothing left reads all (dropped later)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)).float() * scale
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1) * visible
        return probs.to(value.dtype) @ value

    # ------------------------------------------------------------------------------------------- prefill
    def _prefill(self, module, plan: HeadPlan, hidden, position_embeddings, cache) -> torch.Tensor:
        engine = self.engine
        layout = engine.current_layout()
        rows = call_rows(engine)
        cos, sin = position_embeddings
        key, value = self._keys_values(module, hidden, cos, sin, cache)
        # A prefill fills an empty cache from its first slot (a static cache returns its whole buffer).
        key, value = key[:, :, : hidden.shape[1]], value[:, :, : hidden.shape[1]]
        scale = module.scaling
        # The model's mask beyond causal (Gemma3): per call and sliding window, so sliding and full layers differ.
        slide, blocks = attention_sliding_window(module), engine.current_block_ids()
        # Text rows: every head.
        text = rows.text
        query = self._query_rows(module, hidden, text, cos, sin)
        text_mask = ("yopo text mask", slide)
        allowed = engine.call_memo(text_mask, lambda: rows_mask(text, layout.valid, blocks, slide))
        if not plan.pruned or self.pruned_text == "renormalise":
            bias = self._bias(text_mask, allowed, query.dtype)
            if plan.pruned:  # per layer a choice between two masks of the call
                text_keys_name = ("yopo text rows' text keys", slide)
                text_keys = engine.call_memo(text_keys_name, lambda: without_visual_keys(allowed, rows.media))
                bias = torch.where(
                    plan.active.view(1, -1, 1, 1), bias, self._bias(text_keys_name, text_keys, query.dtype)
                )
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale, enable_gqa=True)
        else:
            attended = self._attend(query, key, value, allowed, plan, rows.media, scale)
        text_out, visual_out = module.o_proj(_merge_heads(attended)), None

        # Visual rows: only the heads active for visual tokens.
        visual = rows.visual
        heads = len(plan.active_index)
        flex = self._uses_flex(hidden.device)
        window = None
        if self.window is not None and visual.slots.shape[1]:
            window = self._flex_window(rows, layout, slide) if flex else self._tiles(rows, layout, slide)
        if heads and visual.slots.shape[1]:
            rows_q = None  # every head: the full projections, no weight slices copied
            if plan.pruned:
                rows_q = (
                    plan.active_index.view(-1, 1) * module.head_dim
                    + torch.arange(module.head_dim, device=hidden.device)
                ).flatten()
            query = self._query_rows(module, hidden, visual, cos, sin, rows_q)
            key_a, value_a = key, value
            if not plan.every_kv_head:
                key_a, value_a = key.index_select(1, plan.kv_index), value.index_select(1, plan.kv_index)
            if self.window is None:
                visual_mask = ("yopo visual mask", slide)
                allowed = engine.call_memo(visual_mask, lambda: rows_mask(visual, layout.valid, blocks, slide))
                bias = self._bias(visual_mask, allowed, query.dtype)
                attended = F.scaled_dot_product_attention(query, key_a, value_a, attn_mask=bias, scale=scale)
            elif flex:
                attended = flex_window_attention(query, key_a, value_a, window, scale, self._flex(hidden.device))
            else:
                bias = self._bias(("yopo tiles", slide), window.allowed, query.dtype)
                attended = tiled_attention(query, key_a, value_a, window, scale, bias)
            merged = _merge_heads(attended)
            visual_out = (
                module.o_proj(merged)
                if rows_q is None
                else sliced.inputs(module.o_proj, merged, rows_q, module.o_proj.in_features)
            )
        computed = None if window is None else window.computed_keys
        engine.record_fraction(module.layer_idx, heads=heads / plan.active.numel(), visual_keys=computed)
        return rows.assemble(text_out, visual_out)

    def _dense(self, module, plan: HeadPlan, hidden, position_embeddings, cache) -> torch.Tensor:
        """The same attention over the full rows, the rules as masks: nothing is saved, no rows are gathered."""
        engine = self.engine
        layout, media = engine.current_layout(), engine.current_media()
        cos, sin = position_embeddings
        query = self._heads(module, module.q_proj(hidden), "q_norm")
        key = self._heads(module, module.k_proj(hidden), "k_norm")
        query, key = rotary_function(module)(query, key, cos, sin)  # one call for both, as the module does
        value = self._heads(module, module.v_proj(hidden))
        if cache is not None:
            key, value = cache.update(key, value, module.layer_idx)
            key, value = key[:, :, : hidden.shape[1]], value[:, :, : hidden.shape[1]]
        grid = engine.media_grid() if self.window is not None else None
        slide, blocks = attention_sliding_window(module), engine.current_block_ids()
        dense_name = ("yopo dense mask", slide)
        allowed = engine.call_memo(
            dense_name,
            lambda: dense_model_mask(media, layout.valid, grid, layout.index, self.window, blocks, slide),
        )
        if not plan.pruned:
            bias = self._bias(dense_name, allowed, query.dtype)
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=bias, scale=module.scaling, enable_gqa=True
            )
        else:
            # Per layer only choices between tensors made once per call: few kernels, as the unpatched layer.
            masks = engine.call_memo(
                ("yopo dense head masks", slide), lambda: DenseHeadMasks.of(allowed, media, query.dtype)
            )
            per_head = plan.active.view(1, -1, 1, 1)
            if self.pruned_text == "renormalise":
                mask = torch.where(per_head, masks.allowed, masks.text_keys)
                attended = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=mask, scale=module.scaling, enable_gqa=True
                )
            else:
                attended = self._attend(query, key, value, allowed, plan, media, module.scaling)
            attended = attended * torch.where(per_head, 1.0, masks.text_rows)  # pruned heads' visual rows: 0
        engine.record_fraction(module.layer_idx, heads=1.0)
        return module.o_proj(_merge_heads(attended))

    def _bias(self, name: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The call's bool mask ``name`` as an additive one for queries of ``dtype``, made once per call."""
        return self.engine.call_memo((name, "additive", dtype), lambda: additive_mask(allowed, dtype))

    def _uses_flex(self, device: torch.device) -> bool:
        """The window's kernel: FlexAttention ("flex"; "auto" on CUDA) or tiles of SDPA ("tiles"; "auto" elsewhere)."""
        return self.window_kernel == "flex" or (self.window_kernel == "auto" and device.type == "cuda")

    def _flex(self, device: torch.device):
        if device.type not in self._flex_kernels:
            self._flex_kernels[device.type] = compiled_flex_attention(device)
        return self._flex_kernels[device.type]

    def _flex_window(self, rows: QueryRows, layout, slide: int | None) -> FlexWindow:
        engine = self.engine
        blocks = engine.current_block_ids()
        return engine.call_memo(
            ("yopo flex window", slide),
            lambda: flex_window(rows, engine.media_grid(), layout.index, layout.valid, self.window, blocks, slide),
        )

    def _tiles(self, rows: QueryRows, layout, slide: int | None) -> Tiles:
        """The call's tiles (built once), their mask cut to the model's mask of this layer's kind (once per kind)."""
        engine = self.engine
        base = engine.call_memo("yopo tiles", lambda: tiles(rows, engine.media_grid(), layout.index, self.window))
        blocks = engine.current_block_ids()
        return engine.call_memo(
            ("yopo tiles", slide), lambda: restrict_tiles(base, rows.visual, rows.length, blocks, slide)
        )

    def _query_rows(self, module, hidden, block: RowBlock, cos, sin, rows_q=None) -> torch.Tensor:
        """Queries of a block's rows (only the q_proj outputs ``rows_q`` when given: the active heads)."""
        picked = block.gather(hidden)
        projected = module.q_proj(picked) if rows_q is None else sliced.outputs(module.q_proj, picked, rows_q)
        query = self._heads(module, projected, "q_norm")
        # Every layer of a prefill gets the same cos/sin: their rows for this block are taken once per call.
        cos_b, sin_b = self.engine.call_memo(
            ("yopo rotary rows", id(block), id(cos)), lambda: (block.positions(cos, -2), block.positions(sin, -2))
        )
        return self._rotate(module, query, cos_b, sin_b)

    # ------------------------------------------------------------------------------------------- decode
    def _text_only(self, module, plan: HeadPlan, hidden, position_embeddings, attention_mask, cache):
        cos, sin = position_embeddings
        query = self._rotate(module, self._heads(module, module.q_proj(hidden), "q_norm"), cos, sin)
        key, value = self._keys_values(module, hidden, cos, sin, cache)
        keys, queries = key.shape[2], hidden.shape[1]
        if attention_mask is None:
            slots = torch.arange(keys, device=hidden.device)
            allowed = slots.view(1, -1) <= (keys - queries + torch.arange(queries, device=hidden.device)).view(-1, 1)
            allowed = allowed.view(1, 1, queries, keys)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[..., :keys]
        else:
            allowed = attention_mask[..., :keys] > torch.finfo(attention_mask.dtype).min / 2
        # A sliding layer's cache holds the last keys it has seen: their media flags are the last of the sequence's.
        offset = 0
        if cache is not None and attention_sliding_window(module) is not None:
            offset = max(0, cache.get_seq_length(module.layer_idx) - keys)
        key_media = self.engine.key_media(module.layer_idx, offset + keys)[:, offset:]
        attended = self._attend(query, key, value, allowed, plan, key_media, module.scaling)
        return module.o_proj(_merge_heads(attended))


def _merge_heads(states: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = states.shape
    return states.transpose(1, 2).reshape(batch, length, heads * dim)
