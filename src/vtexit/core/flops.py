"""Analytic FLOPs of a decoder under a token schedule (prefill and per decode token).

FastV (Chen et al., 2024) counts a decoder layer with n tokens, hidden size d and FFN size m as
``4nd^2 + 2n^2d + 2ndm`` (one multiply-add counted once). We extend it to grouped-query attention, to keys that
differ from queries (decode, compacted caches) and to gated MLPs; for plain multi-head attention, c = n and a
two-matrix MLP it reduces to FastV's formula. Papers disagree by 2x on totals, so :data:`FORMULA` is printed
wherever a number is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from vtexit.core.costs import CallCost, RunCost
from vtexit.core.families import FamilySpec, family_for

FORMULA = (
    "per decoder layer, n query tokens attending to c keys: "
    "n*d*(2*h*dh + 2*kv*dh) [q,o and k,v projections] + 2*n*c*h*dh [QK^T and AV] + g*n*d*m [MLP, g=3 if gated "
    "else 2]; in-layer pruning (YOPO) counts only the heads, keys and FFN neurons visual rows used; d hidden, "
    "h heads, kv key/value heads, dh head dim, m FFN size; one multiply-add = 1 FLOP, as in FastV's "
    "4nd^2 + 2n^2d + 2ndm. Prefill: c = n per layer. Decode: n = 1, c = cached keys + 1. "
    "Vision tower, embeddings and LM head excluded."
)


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a decoder layer that the formula needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool
    num_layers: int

    @classmethod
    def from_model(cls, model: nn.Module, family: FamilySpec | None = None) -> DecoderShape:
        """Read the shape from the config; whether the MLP is gated from the first layer's modules."""
        first_layer = (family or family_for(model)).resolve(model).layers[0]
        mlp = getattr(first_layer, "mlp", None)
        return cls.from_config(model.config.get_text_config(), gated=mlp is not None and hasattr(mlp, "gate_proj"))

    @classmethod
    def from_config(cls, text: PretrainedConfig, *, gated: bool) -> DecoderShape:
        """The shape a text config describes (a config alone does not say whether the MLP is gated)."""
        heads = text.num_attention_heads
        return cls(
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            ffn=text.intermediate_size,
            gated=gated,
            num_layers=text.num_hidden_layers,
        )

    def layer(self, n: int, c: int) -> int:
        return round(self.split_layer(0, n, c))

    def split_layer(
        self,
        visual: int,
        text: int,
        c: int,
        head_fraction: float = 1.0,
        ffn_fraction: float = 1.0,
        visual_keys: float | None = None,
    ) -> float:
        """A layer whose visual query rows used only ``head_fraction`` of the heads (q/o projections and attention)
        and ``ffn_fraction`` of the FFN neurons, and attended to ``visual_keys`` keys in total (default: ``c`` each);
        key/value projections are counted for every row."""
        d, h, kv, dh, m = self.hidden, self.heads, self.kv_heads, self.head_dim, self.ffn
        rows = text + visual * head_fraction
        projections = rows * d * 2 * h * dh + (visual + text) * d * 2 * kv * dh
        visual_pairs = visual * c if visual_keys is None else visual_keys
        attention = 2 * (text * c + visual_pairs * head_fraction) * h * dh
        mlp = (3 if self.gated else 2) * (text + visual * ffn_fraction) * d * m
        return projections + attention + mlp


@dataclass(frozen=True)
class FlopsCount:
    prefill: int
    decode_per_token: int | None  # the first decode token, with the prompt in the cache (None: none ran)


def count(shape: DecoderShape, tokens_per_layer: Sequence[int]) -> FlopsCount:
    """FLOPs for one sequence whose layer i holds ``tokens_per_layer[i]`` prompt tokens."""
    if len(tokens_per_layer) != shape.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries, model has {shape.num_layers} layers")
    prefill = sum(shape.layer(n, n) for n in tokens_per_layer)
    decode = sum(shape.layer(1, n + 1) for n in tokens_per_layer)
    return FlopsCount(prefill=prefill, decode_per_token=decode)


def call_flops(shape: DecoderShape, call: CallCost) -> list[int]:
    """FLOPs per batch row of one recorded call (a prefill or a decode step), from what each layer ran."""
    per_row = None
    for layer in call.layers:
        visual, text, keys = layer.visual_queries.tolist(), layer.text_queries.tolist(), layer.keys.tolist()
        pairs = [None] * len(keys) if layer.visual_keys is None else layer.visual_keys.tolist()
        flops = [
            shape.split_layer(v, t, c, layer.head_fraction, layer.ffn_fraction, p)
            for v, t, c, p in zip(visual, text, keys, pairs, strict=True)
        ]
        per_row = flops if per_row is None else [a + b for a, b in zip(per_row, flops, strict=True)]
    return [round(f) for f in per_row or []]


def run_flops(shape: DecoderShape, run: RunCost) -> list[FlopsCount]:
    """Per batch row: prefill FLOPs and the first decode step's FLOPs (None when no decode step ran)."""
    prefill = call_flops(shape, run.prefill)
    decode = call_flops(shape, run.decode[0]) if run.decode else [None] * len(prefill)
    return [FlopsCount(p, d) for p, d in zip(prefill, decode, strict=True)]


def flops_per_row(shape: DecoderShape, run: RunCost | None, inputs: Mapping[str, torch.Tensor]) -> list[FlopsCount]:
    """FLOPs of each row of the call that just ran on ``inputs``: from its cost records (``handle.last_cost``), or,
    unpatched (``run`` None), every prompt token in every layer."""
    if run is not None:
        return run_flops(shape, run)
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    tokens = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    return [count(shape, [n] * shape.num_layers) for n in tokens]


def withdrawal_tokens(num_layers: int, prompt_tokens: int, visual_tokens: int, layer: int) -> list[int]:
    """Tokens per layer under VTW: the whole prompt before ``layer``, text only from it on."""
    if not 0 <= visual_tokens <= prompt_tokens:
        raise ValueError(f"visual_tokens must be in [0, prompt_tokens={prompt_tokens}], got {visual_tokens}")
    return [prompt_tokens if i < layer else prompt_tokens - visual_tokens for i in range(num_layers)]
