"""VTW (Visual Tokens Withdrawal) inside vLLM's decoder, for the LLaVA and Qwen-VL model classes: decoder layers
``< K`` run the whole prompt; from layer ``K`` on, the visual tokens are gone and the text tokens go on alone, at
their original positions (RoPE, or Qwen-VL's M-RoPE (t, h, w) columns), as ``vtexit.withdraw(model, layer=K)``
computes on transformers.

vLLM builds one set of attention metadata per step for all layers, so the model rewrites it for layers ``>= K`` between
layer ``K - 1`` and layer ``K`` and restores it after the last layer (the runner's ``ForwardContext`` is mutable): the
text rows only, each request's context shortened by its visual tokens so far, and the KV slots at the compressed index
(the row's index in its request minus the visual tokens before it) in the request's own blocks. Withdrawn layers thus
never see a visual key. Which rows are visual: the ``is_multimodal`` mask the runner hands ``embed_input_ids`` every
step, before the forward. How many visual tokens a request holds from earlier steps (chunked prefill, decode): the
runner passes no request id to the model, so the count is kept per request's first KV block, reset when a request starts
from an empty context (a new request, a reused block, a preempted request recomputed). This saves compute, not KV
memory: the scheduler still allocates each request's blocks for its full length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vtexit.integrations.vllm import decoder_compat
from vtexit.methods.base import MethodConfig
from vtexit.methods.hybrid import HybridConfig
from vtexit.methods.registry import config_from_dict
from vtexit.methods.vtw import VTWConfig

# decoder layers called as layer(positions, hidden, residual); Qwen-VL's text models take M-RoPE positions (3, rows)
TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "qwen2_vl_text")


def split_setting(setting: Any) -> tuple[Any, int | None]:
    """The ``vtexit`` entry as (the pre-LLM step's setting, the withdrawal layer K or None): ``{"method": "vtw",
    "layer": K}`` keeps every visual token before the LLM (``{"method": "none"}``); ``{"method": "hybrid", "pre":
    ..., "then": {"method": "vtw", "layer": K}}`` reduces them first. Anything else: (setting, None)."""
    config = setting
    if isinstance(setting, Mapping) and setting.get("method") in ("vtw", "hybrid"):
        config = config_from_dict(dict(setting))  # vtexit's own checks (layer an int >= 0, the hybrid's steps)
    if isinstance(config, VTWConfig):
        return {"method": "none"}, config.layer
    if isinstance(config, HybridConfig):
        pre, then = config.steps()
        if not isinstance(then, VTWConfig):
            raise ValueError(
                f"vtexit's vLLM plugin runs a hybrid's in-LLM step as vtw only, got {then.method!r} (use vtexit on "
                "transformers for it)"
            )
        return pre.to_dict(), then.layer
    if isinstance(config, MethodConfig):
        return config.to_dict(), None
    return setting, None


def check_engine(vllm_config: Any, layer: int, language_model: Any) -> None:
    """Refuse, by name, what VTW's metadata rewrite does not handle exactly (ValueError), at load time."""
    text = vllm_config.model_config.hf_config.get_text_config()
    count = int(text.num_hidden_layers)
    if not 1 <= layer <= count:
        raise ValueError(
            f"vtw: layer must be in [1, {count}] for this model, got {layer} (layer 0 must see the whole prompt; "
            f"{count} = number of decoder layers = no withdrawal)"
        )
    if text.model_type not in TEXT_MODELS:
        raise ValueError(f"vtw in vLLM runs on {', '.join(TEXT_MODELS)} language models, not {text.model_type!r}")
    if getattr(text, "sliding_window", None) is not None:
        raise ValueError("vtw in vLLM does not run with sliding-window attention (the window would count slots)")
    refusals = decoder_compat.vtw_refusals(vllm_config)
    if refusals:
        raise ValueError(f"vtw in vLLM does not run with {'; '.join(refusals)}")
    backends = {decoder_compat.attention_backend(a) for a in decoder_compat.attention_layers(language_model)}
    if not backends <= set(decoder_compat.VTW_BACKENDS):
        raise ValueError(
            f"vtw in vLLM rebuilds the attention metadata of {', '.join(decoder_compat.VTW_BACKENDS)} only; this "
            "engine uses "
            f"{', '.join(sorted(backends))}"
        )


@dataclass
class StepPlan:
    """One step's text rows (indices into the step's rows) and the metadata layers ``>= K`` read instead."""

    rows: torch.Tensor
    metadata: dict[str, Any]
    slot_mapping: dict[str, torch.Tensor]

    @contextlib.contextmanager
    def applied(self, context: Any) -> Iterator[None]:
        """Within the block, the forward context's entries of layers ``>= K`` are the text-only ones."""
        saved = {name: (context.attn_metadata[name], context.slot_mapping.get(name)) for name in self.metadata}
        context.attn_metadata.update(self.metadata)
        context.slot_mapping.update(self.slot_mapping)
        try:
            yield
        finally:
            for name, (metadata, slots) in saved.items():
                context.attn_metadata[name] = metadata
                if slots is None:
                    context.slot_mapping.pop(name, None)
                else:
                    context.slot_mapping[name] = slots


class Withdrawal:
    """VTW's state in one model: layer K, the attention layers it rewrites, the last step's visual-row mask and each
    running request's visual-token count (keyed by its first KV block)."""

    def __init__(self, layer: int, decoder_layers: Any) -> None:
        self.layer = layer
        self.attention = {a.layer_name: a for m in decoder_layers[layer:] for a in decoder_compat.attention_layers(m)}
        self.mask: torch.Tensor | None = None
        self.counts: dict[int, int] = {}

    def take_mask(self) -> torch.Tensor | None:
        """The mask of this step's visual rows (from ``embed_input_ids``), used once."""
        mask, self.mask = self.mask, None
        return mask

    def plan(self, context: Any, mask: torch.Tensor | None, positions: torch.Tensor, dtype: torch.dtype) -> StepPlan:
        """The text rows of this step and the metadata of layers ``>= K`` for them; records each request's visual
        tokens so far."""
        metadata = context.attn_metadata
        if not isinstance(metadata, dict) or not isinstance(context.slot_mapping, dict):
            raise ValueError("vtw in vLLM needs one attention-metadata dict per step (no dual-batch overlap)")
        name = next(iter(self.attention))
        query_start, seq_lens, block_table, tokens = decoder_compat.cpu_batch(metadata[name])
        device = positions.device
        if mask is None:
            mask = torch.zeros(tokens, dtype=torch.bool, device=device)
        if mask.shape[0] != tokens:
            raise RuntimeError(f"vtw: the step's visual-row mask has {mask.shape[0]} rows, its metadata {tokens}")
        visual = mask.to(device=device, dtype=torch.long)
        seen = torch.cat([visual.new_zeros(1), visual.cumsum(0)])  # visual rows before each row, and in all
        starts = query_start.to(device=device, dtype=torch.long)
        lengths = starts[1:] - starts[:-1]
        in_step = seen[starts[1:]] - seen[starts[:-1]]
        context_lens = seq_lens.to(torch.long).cpu() - lengths.cpu()
        first_blocks = block_table[:, 0].tolist()
        before_list = []
        for r, (block, start) in enumerate(zip(first_blocks, context_lens.tolist(), strict=True)):
            if start == 0:
                before_list.append(0)
            elif block in self.counts:
                before_list.append(self.counts[block])
            else:
                raise RuntimeError(
                    f"vtw: request row {r} continues a context of {start} tokens this model never ran (prefix "
                    "caching or a KV connector would do this; both are refused at load)"
                )
        before = torch.tensor(before_list, dtype=torch.long, device=device)
        for block, count in zip(first_blocks, (before + in_step).tolist(), strict=True):
            self.counts[block] = count

        request = torch.repeat_interleave(torch.arange(len(first_blocks), device=device), lengths)
        visual_before = before[request] + seen[:tokens] - seen[starts[:-1]][request]
        rows = torch.nonzero(visual[:tokens] == 0).squeeze(1)
        if rows.numel() == 0:  # a step of visual rows only: layers >= K have nothing to run
            return StepPlan(rows, {}, {})
        # each row's index in its request (not its position: M-RoPE positions are not indices), less the visual
        # tokens before it
        index = context_lens.to(device)[request] + torch.arange(tokens, device=device) - starts[:-1][request]
        compressed = index[rows] - visual_before[rows]
        text = lengths - in_step
        keep = text > 0
        text_starts = torch.cat([text.new_zeros(1), text[keep].cumsum(0)]).to(query_start.dtype)
        text_lens = (seq_lens.to(torch.long) - before - in_step)[keep].to(seq_lens.dtype)
        table = block_table[keep]
        new_metadata, new_slots = {}, {}
        built: dict[int, Any] = {}
        for name, attention in self.attention.items():
            block_size = decoder_compat.kv_block_size(attention)
            slots = block_table[request[rows], compressed // block_size].to(torch.long) * block_size
            slots = slots + compressed % block_size
            original = metadata[name]
            if id(original) not in built:
                built[id(original)] = decoder_compat.cpu_text_metadata(
                    original, attention, dtype, text_starts, text_lens, table, slots
                )
            new_metadata[name], new_slots[name] = built[id(original)], slots
        return StepPlan(rows, new_metadata, new_slots)


class WithdrawalMixin:
    """The VTW parts of the LLaVA and Qwen-VL model classes: keep the step's visual-row mask, and run the decoder's
    layers with the visual rows gone from layer K on. ``vtexit_withdrawal`` is None without VTW (the stock forward)."""

    vtexit_withdrawal: Withdrawal | None = None

    def init_withdrawal(self, vllm_config: Any, layer: int | None) -> None:
        """Set VTW up (after the model is built: it reads the attention layers' backends)."""
        if layer is None:
            return
        check_engine(vllm_config, layer, self.language_model)
        model = self.language_model.model
        if layer < len(model.layers):
            self.vtexit_withdrawal = Withdrawal(layer, model.layers)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, **kwargs: Any):
        if self.vtexit_withdrawal is not None:
            self.vtexit_withdrawal.mask = kwargs.get("is_multimodal")
        return super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        withdrawal = self.vtexit_withdrawal
        mask = withdrawal.take_mask() if withdrawal is not None else None
        context = decoder_compat.forward_context() if withdrawal is not None else None
        if withdrawal is None or context is None or not context.attn_metadata:  # no VTW, or a profiling run
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        model = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        residual = None
        for layer in model.layers[: withdrawal.layer]:
            hidden, residual = layer(positions, hidden, residual)
        plan = withdrawal.plan(context, mask, positions, hidden.dtype)
        if plan.rows.numel():
            with plan.applied(context):
                text, text_residual = hidden[plan.rows], residual[plan.rows]
                text_positions = positions[..., plan.rows]  # (rows,) or M-RoPE's (3, rows)
                for layer in model.layers[withdrawal.layer :]:
                    text, text_residual = layer(text_positions, text, text_residual)
            hidden = hidden.index_copy(0, plan.rows, text)
            residual = residual.index_copy(0, plan.rows, text_residual)
        hidden, _ = model.norm(hidden, residual)
        return hidden
