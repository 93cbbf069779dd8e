"""The vLLM internals VTW inside the decoder relies on (:mod:`vtexit.integrations.vllm.withdrawal`), with what each
tested release does: the forward context, the decoder's attention layers and the CPU attention backend's metadata.
The model, processing and vision-tower internals are in :mod:`vtexit.integrations.vllm.compat` (same tested range)."""

from __future__ import annotations

import torch

# --- VTW inside the decoder (vtexit.integrations.vllm.withdrawal; 0.32) ---
# ForwardContext (vllm/forward_context.py): get_forward_context() inside the runner's set_forward_context block, a
#   mutable object whose attn_metadata (dict: layer name -> the backend's metadata; a list of dicts under dual-batch
#   overlap) and slot_mapping (dict: layer name -> (tokens,) KV slots) the attention ops look up by layer name on
#   every call (attention.py: get_attention_context; unified_kv_cache_update writes the KV at
#   forward_context.slot_mapping[layer], not at the metadata's own slot_mapping).
# Attention (vllm/model_executor/layers/attention): a decoder attention layer; ``layer_name`` keys those dicts,
#   ``attn_backend.get_name()`` names its backend, ``impl`` holds num_heads / num_kv_heads / head_size /
#   sliding_window (-1: none) / kv_cache_dtype, ``kv_cache`` the bound cache tensor, ``isa`` the CPU kernel set
#   (set by the CPU metadata builder).
from vllm import _custom_ops as _ops
from vllm import envs as _envs
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention

from vtexit.integrations.vllm.compat import speculative_decoding

VTW_BACKENDS = ("CPU_ATTN",)  # backends whose metadata withdrawal.py rebuilds (tested on CPU only)


def forward_context():
    """The runner's ForwardContext of the running step, or None outside one (profiling, warm-up)."""
    return get_forward_context() if is_forward_context_available() else None


def attention_layers(module: torch.nn.Module) -> list:
    """The vLLM decoder ``Attention`` layers inside ``module``, in order."""
    return [m for m in module.modules() if isinstance(m, Attention)]


def attention_backend(layer) -> str:
    """0.32: ``Attention.attn_backend.get_name()``, e.g. "CPU_ATTN", "FLASH_ATTN"."""
    return layer.attn_backend.get_name()


def vtw_refusals(vllm_config) -> list[str]:
    """The engine settings under which VTW's per-step metadata rewrite is not exact (or not tested), each named as
    the user sets it. 0.32 field names: cache_config.enable_prefix_caching (on by default: a request would start from
    KV blocks whose visual-token count this engine never saw), speculative_config, parallel_config.
    pipeline_parallel_size / decode_context_parallel_size / prefill_context_parallel_size / enable_dbo,
    kv_transfer_config.kv_connector (KV computed elsewhere), model_config.enforce_eager (False: compiled graphs and
    CUDA graphs would replay the full-length metadata)."""
    reasons = []
    if vllm_config.cache_config.enable_prefix_caching:
        reasons.append("prefix caching (pass enable_prefix_caching=False; vllm serve: --no-enable-prefix-caching)")
    if speculative_decoding(vllm_config):
        reasons.append("speculative decoding (speculative_config)")
    parallel = vllm_config.parallel_config
    for name in ("pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"):
        if int(getattr(parallel, name, 1) or 1) > 1:
            reasons.append(f"{name} > 1")
    if getattr(parallel, "enable_dbo", False):
        reasons.append("dual-batch overlap (enable_dbo)")
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is not None and getattr(transfer, "kv_connector", None) is not None:
        reasons.append(f"a KV connector ({transfer.kv_connector})")
    if not vllm_config.model_config.enforce_eager:
        reasons.append("compiled / CUDA-graph execution (pass enforce_eager=True; vllm serve: --enforce-eager)")
    return reasons


def cpu_batch(metadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A step's ``(query_start_loc, seq_lens, block_table, num_actual_tokens)`` from the CPU backend's metadata
    (``CPUAttentionMetadata``, vllm/v1/attention/backends/cpu_attn.py; 0.32): per scheduled request, its rows'
    start (requests+1,), its context length after the step (requests,) and its KV block ids (requests, blocks)."""
    if getattr(metadata, "dynamic_causal", None) is not None or getattr(metadata, "encoder_cache", None) is not None:
        raise ValueError("VTW in vLLM runs on causal decoder attention only")
    return metadata.query_start_loc, metadata.seq_lens, metadata.block_table, int(metadata.num_actual_tokens)


def kv_block_size(layer) -> int:
    """Tokens per KV block as the kernel addresses them: 0.32's CPU cache is (blocks, kv_heads, block_size,
    2 * head_size) (``CPUAttentionBackendImpl.do_kv_cache_update``)."""
    return int(layer.kv_cache.shape[2])


def cpu_text_metadata(metadata, layer, dtype, query_start_loc, seq_lens, block_table, slot_mapping):
    """The CPU metadata of a text-only step: ``metadata`` with the given rows and requests, and the kernel's
    ``scheduler_metadata`` rebuilt as ``CPUAttentionMetadataBuilder.build`` does (0.32:
    ``ops.cpu_attn_get_scheduler_metadata`` with the model's ``dtype``, the layer's heads, window and ``isa``, and
    ``VLLM_CPU_ATTN_SPLIT_KV``); without it the kernel would split work by the full-length step."""
    import dataclasses

    impl = layer.impl
    scheduler = _ops.cpu_attn_get_scheduler_metadata(
        num_reqs=int(seq_lens.shape[0]),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=query_start_loc,
        causal=metadata.causal,
        sliding_window_size=impl.sliding_window,
        isa=layer.isa,
        enable_kv_split=_envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    return dataclasses.replace(
        metadata,
        num_actual_tokens=int(query_start_loc[-1]),
        max_query_len=int(lengths.max()),
        query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=block_table,
        slot_mapping=slot_mapping,
        scheduler_metadata=scheduler,
    )
