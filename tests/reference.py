"""An independent reference for token schedules: decoder layers run by hand, one row at a time.

It records what the unpatched model feeds each decoder layer, then, for one row, runs the layers from the first
event on itself, on the positions the schedule keeps: hidden states, rotary cos/sin and position ids are sliced
with plain indexing (original positions kept), and the causal (or sliding-window) mask is built here from scratch,
with Gemma3's bidirectional image blocks where the row still holds image tokens. Nothing in vtexit is used.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vtexit.core.transformers_compat import with_cache


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


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Per position: the index of its run of consecutive image tokens (type 1), or -1 for text. By hand."""
    blocks = torch.full(token_type_ids.shape, -1, dtype=torch.long)
    for b in range(token_type_ids.shape[0]):
        block, previous = -1, False
        for i, kind in enumerate(token_type_ids[b].tolist()):
            if kind == 1:
                block += 0 if previous else 1
                blocks[b, i] = block
            previous = kind == 1
    return blocks


def _hand_mask(
    n: int, layer_type: str, window: int | None, impl: str, dtype: torch.dtype, blocks: torch.Tensor | None = None
) -> torch.Tensor:
    q = torch.arange(n).unsqueeze(1)
    k = torch.arange(n).unsqueeze(0)
    allowed = k <= q
    if blocks is not None:
        allowed |= (blocks.unsqueeze(1) == blocks.unsqueeze(0)) & (blocks.unsqueeze(1) >= 0)
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
    return scheduled_logits(model, seen, b, [(layer, text_positions)])


def scheduled_logits(
    model: nn.Module,
    seen: list,
    b: int,
    events: list[tuple[int, torch.Tensor]],
    blocks: torch.Tensor | None = None,
    renumber: bool = False,
) -> torch.Tensor:
    """Logits of row b under a schedule: ``events`` are (layer, original positions kept from that layer on), in
    layer order, each a subset of the one before. ``blocks`` (the row's image blocks, -1 for text) adds Gemma3's
    bidirectional attention inside each image to the hand-built masks. ``renumber``: after the (single) event the
    kept tokens take consecutive positions from the first one on (rotary from the model's own rotary module)."""
    lm, layers, norm, head = _lm_parts(model)
    config = lm.config
    first_layer, idx = events[0]
    hidden = _row(seen[first_layer][0], b, 1, idx)
    later = dict(events[1:])
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    impl = config._attn_implementation
    with torch.no_grad():
        for j in range(first_layer, len(layers)):
            if j in later:
                subset = later[j]
                slots = torch.tensor([idx.tolist().index(p) for p in subset.tolist()], dtype=torch.long)
                hidden, idx = hidden[:, slots], subset
            kwargs = dict(seen[j][1])
            if renumber:
                first = _row(kwargs["position_ids"], b, -1, idx[:1])
                positions = first + torch.arange(len(idx)).unsqueeze(0)
                kwargs["position_ids"] = positions
                # Gemma3's rotary embedding takes the layer type (one base per attention type).
                takes_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
                kwargs["position_embeddings"] = (
                    lm.rotary_emb(hidden, positions, types[j]) if takes_type else lm.rotary_emb(hidden, positions)
                )
            else:
                kwargs["position_embeddings"] = tuple(_row(t, b, -2, idx) for t in kwargs["position_embeddings"])
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = _row(kwargs["position_ids"], b, -1, idx)
            kwargs["attention_mask"] = _hand_mask(
                len(idx),
                types[j],
                getattr(config, "sliding_window", None),
                impl,
                hidden.dtype,
                None if blocks is None else blocks[idx],
            )
            kwargs = with_cache(kwargs, layers[j], None)
            kwargs["use_cache"] = False
            hidden = layers[j](hidden, **kwargs)
        return head(norm(hidden))[0]


TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def greedy_no_cache(
    model: nn.Module,
    inputs: dict,
    steps: int,
    *,
    suppress: list[int] | None = None,
    ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding by recomputing the whole sequence at every step (no cache), from ``ids`` (default: the
    prompt). ``suppress``: token ids never chosen (e.g. media ids, so no generated token is an image token)."""
    ids = inputs["input_ids"] if ids is None else ids
    mask = inputs["attention_mask"] if mask is None else mask
    for _ in range(steps):
        step = dict(inputs, input_ids=ids, attention_mask=mask)
        for key in set(TOKEN_TYPE_KEYS) & step.keys():  # per-token inputs grow with the sequence (text = 0)
            grown = torch.zeros_like(ids)
            grown[:, : step[key].shape[1]] = step[key]
            step[key] = grown
        logits = model(**step, use_cache=False).logits[:, -1]
        if suppress:
            logits[:, suppress] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids
