"""How the plugin reads vLLM's own vision-tower modules for VisionZip (CLIP, SigLIP and the Qwen-VL vision
transformers as vLLM 0.32 builds them), with what each tested release does. No vLLM import: these read the modules
vLLM built; what the plugin imports from vLLM is in :mod:`vtexit.integrations.vllm.compat`."""

from __future__ import annotations

import contextlib

import torch


def clip_selected_layer(vision_tower, pixel_values):
    """For VisionZip: run vLLM's CLIP tower (``CLIPVisionModel`` in ``vllm/model_executor/models/clip.py``) and
    return its last layer's output (images, 1 + patches, dim; CLS first, no post-norm), that layer's CLS query
    projection (images, 1, dim) and key projections (images, 1 + patches, dim) of its normed input, and its head count.

    0.32: LLaVA builds the tower only up to ``vision_feature_layer`` (one int) with ``require_post_norm=False``, so
    the last built layer is the one the projector reads and ``post_layernorm`` is None; the tower's forward is
    ``embeddings`` -> ``pre_layrnorm`` -> ``encoder.layers``; a layer's attention projects with one fused
    ``self_attn.qkv_proj`` (q, k, v chunks of its output; returns ``(output, bias)``), with
    ``self_attn.num_heads_per_partition`` heads, split across tensor-parallel ranks when ``tp_size`` > 1."""
    model = vision_tower.vision_model
    if model.post_layernorm is not None:
        raise ValueError("visionzip in vLLM expects LLaVA's tower without its post-norm (vLLM 0.32 builds it so)")
    hidden = model.pre_layrnorm(model.embeddings(pixel_values))
    *before, last = model.encoder.layers
    for layer in before:
        hidden = layer(hidden)
    attention = last.self_attn
    if attention.tp_size != 1:
        raise ValueError("visionzip in vLLM runs with the vision tower on one rank (tensor parallelism: not yet)")
    qkv, _ = attention.qkv_proj(last.layer_norm1(hidden))
    query, keys, _ = qkv.chunk(3, dim=-1)
    return last(hidden), query[:, :1], keys, attention.num_heads_per_partition


class FusedProjection(torch.nn.Module):
    """The query (``part`` 0) or key (1) projection of a vLLM attention's fused ``qkv_proj``, as a module of its
    own, for vtexit's scoring code, which calls a tower layer's query and key projections separately (``part`` None:
    the whole fused output, as transformers' Qwen-VL ``attn.qkv`` gives it). 0.32: ``qkv_proj(x)`` returns
    ``(output, bias)``, the output q, k, v chunks (one rank), each heads x head_dim."""

    def __init__(self, qkv_proj: torch.nn.Module, part: int | None) -> None:
        super().__init__()
        self.qkv_proj, self.part = qkv_proj, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        return qkv if self.part is None else qkv.chunk(3, dim=-1)[self.part]


# --- Qwen-VL vision transformers (Qwen2VisionTransformer in qwen2_vl.py, Qwen2_5_VisionTransformer in
# qwen2_5_vl.py, 0.32) ---
# ``visual.blocks``: the blocks, each called as blk(x, cu_seqlens=, rotary_pos_emb_cos=, rotary_pos_emb_sin=,
#   max_seqlen=, ...) with x (patches, 1, dim) (2.5-VL: in window order), cu_seqlens the per-frame bounds on
#   full-attention blocks (window bounds on 2.5-VL's others; ``visual.fullatt_block_indexes``), cos / sin
#   (patches, head_dim / 2) applied in rotate-half (neox) form; block.norm1 before block.attn, whose fused
#   ``attn.qkv`` (QKVParallelLinear: (output, bias), output q | k | v, each heads x head_dim) has
#   ``attn.tp_size`` ranks; blk.attn is called as attn(norm1(x), cu_seqlens=, rotary_pos_emb_cos=,
#   rotary_pos_emb_sin=, ...). 2.5-VL's block is wrapped by support_torch_compile, whose __call__ runs forward
#   directly (no module hooks on the block itself: the plugin hooks its attn). The tower runs once per
#   _process_image_input call (not with mm_encoder_tp_mode="data", which shards it).
def qwen_scored_block(visual) -> torch.nn.Module:
    """VisionZip's block of a vLLM Qwen-VL vision transformer: the last full-attention block (2.5-VL's largest
    ``fullatt_block_indexes``, else the last); ValueError where its attention is split across ranks."""
    full = getattr(visual, "fullatt_block_indexes", None)
    block = visual.blocks[max(full) if full else len(visual.blocks) - 1]
    if block.attn.tp_size != 1:
        raise ValueError("visionzip in vLLM runs with the vision tower on one rank (tensor parallelism: not yet)")
    return block


class QwenBlockView(torch.nn.Module):
    """A vLLM Qwen-VL vision block as vtexit's scoring code reads transformers' one: ``norm1`` and ``attn.qkv``
    (one tensor out). Its ``norm1`` is the identity: :func:`qwen_block_calls` hands over the attention's input,
    which the block's own norm1 made."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.norm1 = torch.nn.Identity()
        self.attn = torch.nn.Module()
        self.attn.qkv = FusedProjection(block.attn.qkv, None)


@contextlib.contextmanager
def qwen_block_calls(block):
    """Within the block, every call of the vLLM Qwen-VL vision ``block``'s attention, in the layout of
    transformers' block call: ``((normed,), {"cu_seqlens": ..., "position_embeddings": (cos, sin)})`` with normed
    (patches, dim) the block's input after its norm1, and cos / sin (patches, head_dim) in rotate-half form (vLLM's
    halves, repeated)."""
    calls: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["x"]
        cos, sin = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
        rotary = (torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))
        calls.append(((hidden.squeeze(1),), {"cu_seqlens": kwargs["cu_seqlens"], "position_embeddings": rotary}))

    handle = block.attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def siglip_selected_layer(vision_tower, pixel_values) -> tuple:
    """For VisionZip on a SigLIP tower: run vLLM's ``SiglipVisionModel`` (``vllm/model_executor/models/siglip.py``)
    and return its last layer's output (images, patches, dim), that layer's input (images, patches, dim), its
    pre-attention norm, its query and key projections (:class:`FusedProjection`) and its head count.

    0.32: LLaVA builds the tower only up to ``vision_feature_layer`` (one int) with ``require_post_norm=False`` and
    no pooling head, so the last built layer is the one the projector reads (``"full"`` strategy: every patch); the
    tower's forward is ``embeddings`` -> ``encoder.layers``, each layer returning ``(hidden, None)``, with
    ``layer_norm1`` before ``self_attn`` (fused ``qkv_proj``, ``num_heads_per_partition`` heads, split across
    tensor-parallel ranks when ``tp_size`` > 1)."""
    model = vision_tower.vision_model
    if model.post_layernorm is not None or model.head is not None:
        raise ValueError("visionzip in vLLM expects LLaVA's SigLIP tower without post-norm and head (vLLM 0.32)")
    hidden = model.embeddings(pixel_values)
    *before, last = model.encoder.layers
    for layer in before:
        hidden, _ = layer(hidden)
    attention = last.self_attn
    if attention.tp_size != 1:
        raise ValueError("visionzip in vLLM runs with the vision tower on one rank (tensor parallelism: not yet)")
    output, _ = last(hidden)
    query, key = FusedProjection(attention.qkv_proj, 0), FusedProjection(attention.qkv_proj, 1)
    return output, hidden, last.layer_norm1, query, key, attention.num_heads_per_partition
