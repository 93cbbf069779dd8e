"""An independent reference for withdrawal: decoder layers run by hand, one row at a time.

For a single row without padding, it records what the unpatched model feeds each decoder layer, then runs
layers K..N-1 itself on the non-visual positions only: hidden states, rotary cos/sin and position ids are sliced
with plain indexing, and the causal (or sliding-window) mask is built here from scratch. Nothing in vtexit is used.
"""

from __future__ import annotations

import torch
from torch import nn


def _lm_parts(model: nn.Module):
    core = model.model
    lm = core.text_model if hasattr(core, "text_model") else core.language_model
    return lm, lm.layers, lm.norm, model.get_output_embeddings()


def record_layer_inputs(model: nn.Module, inputs: dict) -> list[tuple[torch.Tensor, dict]]:
    """Inputs (hidden states, kwargs) of every decoder layer in one unpatched forward."""
    _, layers, _, _ = _lm_parts(model)
    seen: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.detach().clone(), dict(kwargs)))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _hand_mask(n: int, layer_type: str, window: int | None, impl: str, dtype: torch.dtype) -> torch.Tensor:
    q = torch.arange(n).unsqueeze(1)
    k = torch.arange(n).unsqueeze(0)
    allowed = k <= q
    if layer_type == "sliding_attention" and window is not None:
        allowed &= (q - k) < window
    allowed = allowed.view(1, 1, n, n)
    if impl == "eager":
        return torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _row(tensor: torch.Tensor, b: int, seq_dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Row b (batch dim just before seq_dim, possibly broadcast) at sequence positions idx."""
    seq_dim %= tensor.ndim
    batch_dim = seq_dim - 1
    row = tensor.narrow(batch_dim, b if tensor.shape[batch_dim] > 1 else 0, 1)
    return row.index_select(seq_dim, idx)


def withdrawn_logits(model: nn.Module, seen: list, b: int, text_positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits (len(text_positions), vocab) of row b with every other position dropped before `layer`.

    `seen` is `record_layer_inputs` of the unpatched model on the batch: its layer-`layer` input is the result of
    layers 0..layer-1 on the full sequence.
    """
    lm, layers, norm, head = _lm_parts(model)
    config = lm.config
    idx = text_positions
    hidden = _row(seen[layer][0], b, 1, idx)
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    impl = config._attn_implementation
    with torch.no_grad():
        for j in range(layer, len(layers)):
            kwargs = dict(seen[j][1])
            kwargs["position_embeddings"] = tuple(_row(t, b, -2, idx) for t in kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = _row(kwargs["position_ids"], b, -1, idx)
            kwargs["attention_mask"] = _hand_mask(
                len(idx), types[j], getattr(config, "sliding_window", None), impl, hidden.dtype
            )
            kwargs["past_key_values"] = None
            kwargs["use_cache"] = False
            hidden = layers[j](hidden, **kwargs)
        return head(norm(hidden))[0]
