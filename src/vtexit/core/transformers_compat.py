"""Every use of transformers beyond its public model API, in one place, with the releases each item was read from.

vtexit works inside transformers' models (hooks on decoder layers, rebuilt masks, caches, generate's inputs), so a
minor release can move what it relies on. Each item below says which releases behave how; the next release that
breaks something is fixed here. Tested range: ``TESTED_FLOOR`` up to, not including, ``TESTED_NEXT`` (the suite
passes on each tested release; ``make canary`` tries the newest one).

The vision towers' internals (pixel shuffles, the Qwen-VL towers' window order, fused projections and outputs, the
anyres packing method) are in :mod:`vtexit.core.vision_compat`, in the same style, so this file stays one job.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from packaging.version import Version
from torch import nn
from transformers import CompileConfig
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation import utils as generation_utils
from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_overlay,
)

__all__ = [
    "Cache",
    "StaticLayer",
    "MEDIA_INPUT_NAMES",
    "TESTED_FLOOR",
    "TESTED_NEXT",
    "TESTED_RANGE",
    "anyres_helpers",
    "blockwise_overlay",
    "cache_keyword",
    "cache_kwargs",
    "causal_mask",
    "check_tested_version",
    "compiled_decode_config",
    "DEEPSTACK_METHOD",
    "deferred_stop_checks",
    "find_cache",
    "forget_compiled_call",
    "generate_encodes_media_first",
    "has_deepstack",
    "mrope_offset",
    "is_tested_version",
    "kv_bytes_per_layer",
    "output_cache",
    "takes_layer_type",
    "uses_multimodal_rope",
    "rotary_embeddings",
    "rotary_function",
    "attention_is_causal",
    "attention_sliding_window",
    "attention_softcap",
    "size_static_layer",
    "sliding_window_overlay",
    "take_cache",
    "with_cache",
]

# ------------------------------------------------------------------------------------------------ versions
# The releases the suite runs on (.ci/run: the constraints file's release and the floor). pyproject.toml declares
# the same range.
TESTED_FLOOR = "5.17.0"
TESTED_NEXT = "5.26"
TESTED_RANGE = f">={TESTED_FLOOR},<{TESTED_NEXT}"


def is_tested_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the transformers in use now) is inside the tested range."""
    version = sys.modules["transformers"].__version__ if version is None else version
    return Version(TESTED_FLOOR) <= Version(version) < Version(TESTED_NEXT)


def check_tested_version(version: str | None = None) -> bool:
    """Warn once per call site when the installed transformers is outside the tested range (users who install with
    ``--no-deps`` should know). Returns whether it is inside."""
    version = sys.modules["transformers"].__version__ if version is None else version  # the module in use now
    inside = is_tested_version(version)
    if not inside:
        warnings.warn(
            f"vtexit is tested with transformers {TESTED_RANGE}; found {version}. Patched models may fail or refuse "
            f"calls; install a tested release (pip install 'transformers{TESTED_RANGE}').",
            UserWarning,
            stacklevel=3,
        )
    return inside


# ------------------------------------------------------------------------------------------------ the KV cache
# <= 5.23: every forward (top model, core model, text model, decoder layer, attention) takes ``past_key_values``.
# >= 5.24: they take ``cache``; the old name is still accepted by a ``deprecate_kwarg`` decorator on ``forward``
#   (FutureWarning until 5.40), which renames inside the call: forward *pre-hooks run before it* and see whatever
#   name the caller used (transformers' own layers pass ``cache``).
# 5.25: the decorators add ``expose_in_signature=True``, so ``inspect.signature`` lists both names: test for
#   ``cache`` being present, never for ``past_key_values`` being absent.
# Model outputs: ``.past_key_values`` up to 5.23; ``.cache`` from 5.24 (``.past_key_values`` is a property that
#   logs a deprecation).
CACHE_KEYWORDS = ("cache", "past_key_values")


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward was called with, under either name, else any ``Cache`` among the keyword arguments (a
    future rename still finds it). None when the call has none."""
    for name in CACHE_KEYWORDS:
        value = kwargs.get(name)
        if value is not None:
            return value
    for value in kwargs.values():
        if isinstance(value, Cache):
            return value
    return None


def take_cache(kwargs: dict) -> Any:
    """Remove the cache from ``kwargs`` (every name it may be under) and return it (None if absent)."""
    cache = find_cache(kwargs)
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)
    for name in [n for n, v in kwargs.items() if v is not None and v is cache]:
        kwargs.pop(name)
    return cache


@functools.cache  # a pure function of the forward's signature
def _cache_keyword_of(function: Callable) -> str:
    parameters = inspect.signature(function).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise ValueError(
        f"{getattr(function, '__qualname__', function)} takes none of {list(CACHE_KEYWORDS)}; vtexit does not know "
        "how this transformers release passes the KV cache"
    )


def cache_keyword(function_or_module: Callable | nn.Module) -> str:
    """The keyword under which ``function_or_module``'s ``forward`` accepts the cache in this release."""
    function = function_or_module
    if isinstance(function_or_module, nn.Module):
        function = type(function_or_module).forward
    return _cache_keyword_of(function)


def with_cache(kwargs: dict, target: Callable | nn.Module, cache: Any) -> dict:
    """``kwargs`` (a copy) with the cache under the one name ``target``'s forward accepts, and no other name."""
    kwargs = dict(kwargs)
    take_cache(kwargs)
    kwargs[cache_keyword(target)] = cache
    return kwargs


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling ``model(...)`` or ``model.generate(...)`` with a cache in this release, with no
    deprecation warning (``model(**inputs, **cache_kwargs(model, cache))``)."""
    return {cache_keyword(model): cache}


def output_cache(output: Any) -> Any:
    """The cache a model output returned (``.cache`` from 5.24, ``.past_key_values`` before), without the
    deprecation log."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


# Cache fields vtexit reads (5.17-5.25): ``cache.layers`` (one layer object per decoder layer), each with ``keys`` /
#   ``values`` tensors once filled; ``get_seq_length()`` (an int on dynamic caches, a 0-dim tensor on static ones),
#   ``get_max_length()``, ``is_compileable`` (static), ``offloading``; static layers count their own length
#   (``cumulative_length``), so a compacted layer writes its kept slots from the front.
def kv_bytes_per_layer(cache: Cache) -> tuple[int, ...]:
    """Bytes held by the keys and values of each layer of a cache."""
    return tuple(
        sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
        for layer in cache.layers
    )


# ``StaticLayer`` (5.17-5.25): ``max_cache_len`` sizes its ``keys`` / ``values`` buffers, which are allocated at the
#   layer's first ``update`` (``lazy_initialization``, unless generate initialised them early, which it does only for
#   chunked prefill); ``get_mask_sizes`` reports ``max_cache_len`` as the key length; ``is_initialized``;
#   ``reset()`` zeroes the buffers and ``cumulative_length`` in place. Layers of one cache may differ in length.
def static_layer_length(layer: StaticLayer) -> torch.Tensor:
    """Slots a static layer has written (a 0-dim tensor on its device: reading it does not sync)."""
    return layer.cumulative_length


def size_static_layer(layer: StaticLayer, length: int) -> None:
    """Make a static layer hold ``length`` slots: set before its first write it is allocated at that size; a layer
    allocated at another size (a reused cache) gives its buffers up and is allocated again at its next write."""
    if layer.max_cache_len == length:
        return
    layer.max_cache_len = length
    if layer.is_initialized:
        layer.keys, layer.values, layer.is_initialized = None, None, False
        layer.cumulative_length.zero_()


# ------------------------------------------------------------------------------------------------ per-layer kwargs
# What the text model computes once before its layer loop and passes to every decoder layer, which the engine's
# layer hooks read and rewrite (5.17-5.25, every supported family): ``hidden_states`` (positional), ``attention_mask``
# (a 4D tensor, or None when SDPA may run causal), ``position_embeddings`` ((cos, sin), sequence dim -2),
# ``position_ids`` (sequence dim -1; (3, batch, length) for M-RoPE families) and the cache (see above); ``use_cache``
# in most families (not Qwen3-VL or Gemma3, whose core alone gets it). tests/test_transformers_compat.py checks these
# on every family with the installed release.
LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


# ------------------------------------------------------------------------------------------------ rotary embeddings
# The text model's ``rotary_emb(hidden, position_ids)`` returns (cos, sin) for the positions (5.17-5.25). Gemma3's
#   takes a third argument, ``layer_type``, and the text model computes one pair per attention type (its sliding and
#   full layers use different bases); the Qwen-VL families' take (3, batch, length) M-RoPE positions.
def uses_multimodal_rope(text_config: Any) -> bool:
    """Whether a text config numbers positions in 3D (M-RoPE: its ``rope_parameters`` carry ``mrope_section``)."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    return "mrope_section" in rope


def takes_layer_type(rotary: nn.Module) -> bool:
    """Whether ``rotary``'s forward needs the layer type (one embedding per attention type)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


def rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer_type: str) -> tuple:
    """(cos, sin) of ``positions`` for a layer of ``layer_type``, as the text model computes them for its layers."""
    if takes_layer_type(rotary):
        return rotary(hidden, positions, layer_type)
    return rotary(hidden, positions)


# Qwen2-VL / Qwen2.5-VL / Qwen3-VL cores keep ``rope_deltas`` (batch, 1) after a prefill with media: the next text
#   position minus the prompt's length (the image grids take fewer positions than tokens), from which they number
#   decode tokens when no ``position_ids`` are passed (5.17-5.25). In 5.25 such a call with a 2D attention mask
#   fails in the unpatched model too (it numbers every column of the mask): pass ``position_ids`` or no mask.
def mrope_offset(core: nn.Module) -> torch.Tensor | None:
    return getattr(core, "rope_deltas", None)


# ------------------------------------------------------------------------------------------------ deepstack
# Qwen3-VL's text model adds visual features from inner tower layers to the output of its first few decoder layers,
#   ``hidden = self._deepstack_process(hidden, visual_pos_masks, deepstack_visual_embeds[layer_idx])`` with a
#   full-prompt (batch, length) mask and one feature row per visual token, in the mask's row-major order (5.17-5.25).
DEEPSTACK_METHOD = "_deepstack_process"


def has_deepstack(language_model: nn.Module) -> bool:
    return callable(getattr(type(language_model), DEEPSTACK_METHOD, None))


# ------------------------------------------------------------------------------------------------ masks
# ``create_causal_mask`` / ``create_sliding_window_causal_mask``: positional order (config, inputs_embeds,
#   attention_mask, cache, position_ids) from 5.10 on (5.0 had cache_position before the cache); the cache parameter
#   is ``past_key_values`` up to 5.23 and ``cache`` from 5.24 (the old name warns until 5.40), so it is passed
#   positionally. ``layer_idx`` and ``allow_is_causal_skip`` exist from 5.17 (not in 5.10); ``block_sequence_ids``
#   (bidirectional media blocks) and ``blockwise_overlay`` from 5.10.
# Mask sizes come from the cache layer's ``get_mask_sizes`` (unchanged 5.17-5.25).
def causal_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    *,
    sliding: bool = False,
    **options,
):
    """transformers' causal (or sliding-window causal) mask builder, with the cache passed positionally."""
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(config, inputs_embeds, attention_mask, cache, None, **options)


# ------------------------------------------------------------------------------------------------ generate
# Inputs generate drops after the prefill (pixel values and friends): ``MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL``
#   exists from 5.17 (absent in 5.10); 5.25 adds ``padding_mask`` (audio models) to it, which is not a media input
#   of any family vtexit supports, so it is left out.
# Static caches: generate prepares a 4D mask (or a mapping per layer type) for them and passes it instead of the
#   2D padding mask (5.17-5.25); ``StaticCache.get_max_length()`` and ``is_compileable`` (5.17-5.25); static layers
#   are ``StaticLayer`` instances with ``keys`` / ``values`` buffers.
# Chunked prefill (``generate(prefill_chunk_size=...)``): 5.17 passes no media inputs to any chunk (the model never
#   sees the image); 5.23-5.25 pass them (or their encoded features, ``mm_encoder_outputs``) with the first chunk.
#   vtexit refuses media on a non-empty cache and a chunk that ends inside an image either way.
MEDIA_INPUT_NAMES: tuple[str, ...] = tuple(n for n in MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL if n != "padding_mask")


# Beam search and ``num_return_sequences`` (``expand_size`` copies of each row): where generate encodes the media
#   before the prefill (5.25, for a model whose ``forward`` takes ``mm_encoder_outputs``: ``_supports_mm_encoder_
#   outputs``), ``_expand_multimodal_outputs`` repeats each row's encoded images for the row's copies, and the tower
#   runs once on the unrepeated pixels. Otherwise (5.17; 5.25 for a model without that parameter) ``_expand_inputs_
#   for_generation`` repeats every tensor input along dim 0 (``repeat_interleave``) before the prefill, the pixel
#   inputs included: the tower sees each ``pixel_values`` entry (an image, or on InternVL a tile) ``expand_size``
#   times in a row, and the model fills the copies' image slots with them in that order, so the copies of a row that
#   holds more than one entry (and the rows after it) get other images than the row's, unpatched as well. The
#   Qwen-VL families' own ``_expand_inputs_for_generation`` repeats each row's patches instead (5.17-5.25).
def generate_encodes_media_first(model: nn.Module) -> bool:
    """Whether ``model.generate`` encodes the media before the prefill (passes ``mm_encoder_outputs``)."""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


# Compiled decode: ``PreTrainedModel.get_compiled_call`` keeps ``model._compiled_call`` (``torch.compile`` of
#   ``model.__call__``, bound to that model) and reuses it while the compile config is unchanged (5.17-5.25).
#   ``copy.deepcopy(model)`` copies the attribute, so a copy would decode with the original's forward and hooks.
def forget_compiled_call(model: nn.Module) -> None:
    """Drop the compiled forward generate kept on ``model`` (it is made again, for this model, on next use)."""
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_last_compile_config", None)


# ``CompileConfig._compile_all_devices`` (private, 5.17-5.25): generate compiles its decode step only on accelerators
#   unless it is set; vtexit's benchmarks and tests set it to run the same compiled decode on the CPU.
def compiled_decode_config(**options) -> CompileConfig:
    """A ``CompileConfig(**options)`` that generate compiles with on every device, the CPU included."""
    config = CompileConfig(**options)
    config._compile_all_devices = True
    return config


# ``DeferredStopCheck`` (transformers.generation.utils, 5.17-5.25): generate's decode loop reads whether every row has
#   stopped as a Python bool at each step, a host sync, unless ``DeferredStopCheck.is_supported`` allows reading that
#   flag one step late; it allows it on MPS only ("we should enable it for cuda if we observe perf gains"). Its flag
#   copy needs device events, which the CPU backend lacks.
@contextmanager
def deferred_stop_checks(device_type: str = "cuda") -> Iterator[None]:
    """Within the block, generate reads its stop flag one step late on ``device_type`` too (no host sync per decode
    step), in every model of the process: an experiment for benchmarks (does that sync dilute what a method saves per
    decode step?), not something vtexit's patches do. The tokens are the same; the check is restored on exit."""
    check = generation_utils.DeferredStopCheck
    original = check.__dict__["is_supported"]

    def is_supported(device: torch.device, cache: Any, cache_is_returned: bool, is_assistant: bool) -> bool:
        # transformers' own conditions (no assistant; a cache it cannot crop is not returned), asked as for MPS
        device = torch.device("mps") if device.type == device_type else device
        return original.__func__(device, cache, cache_is_returned, is_assistant=is_assistant)

    check.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        check.is_supported = original


# ------------------------------------------------------------------------------------------------ rotary
# Llama-style attention modules use their modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)`` (5.0-5.25).
def rotary_function(attention: nn.Module) -> Callable | None:
    """The module-level ``apply_rotary_pos_emb`` of ``attention``'s modeling file (None if it has none)."""
    return getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)


# ------------------------------------------------------------------------------------------------ attention rules
# What an attention module says about its mask (5.17-5.25): ``sliding_window`` is the window of a sliding layer and None
#   on a full one (Gemma3Attention; Qwen2-style modules use the same name); the model's mask of a sliding layer keeps
#   key slot k for query slot q when ``k > q - sliding_window`` (masking_utils.sliding_window_overlay: one-sided, so
#   later keys of the query's own bidirectional block stay), and a sliding cache layer keeps the last
#   ``sliding_window - 1`` keys (``Cache.get_seq_length(layer_idx)`` counts every key it has seen, an int).
#   Gemma3 composes its masks as AND(sliding window, OR(causal, same image block)) on sliding layers and OR(causal,
#   same image block) on full ones (modeling_gemma3.create_masks_for_vision_model, image blocks from
#   ``token_type_ids``). ``is_causal`` is False under ``use_bidirectional_attention`` (every key, both ways).
#   ``attn_logit_softcapping`` (Gemma3, None by default) is stored but not passed to the attention function by
#   Gemma3Attention.forward in 5.17-5.25, so the model does not cap; vtexit refuses a module where it is set.
def attention_sliding_window(attention: nn.Module) -> int | None:
    """The sliding window of ``attention``'s layer (None: full attention)."""
    return getattr(attention, "sliding_window", None)


def attention_softcap(attention: nn.Module) -> float | None:
    """``attention``'s logit softcapping setting (None when unset or absent)."""
    return getattr(attention, "attn_logit_softcapping", None)


def attention_is_causal(attention: nn.Module) -> bool:
    """Whether ``attention`` masks its text causally (False: a bidirectional text model)."""
    return getattr(attention, "is_causal", True) is not False


# ------------------------------------------------------------------------------------------------ anyres
# LLaVA-NeXT and LLaVA-OneVision lay out an anyres image with module-level helpers of their modeling files (5.17-5.25,
#   the same code in both files): ``get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size)`` -> (tiles
#   high, tiles wide) of the canvas ``select_best_resolution`` picks, and ``unpad_image(tensor, original_size)``, the
#   (channels, height, width) feature map cropped back to the image's aspect ratio. OneVision's video newline is
#   appended by ``forward`` in 5.17 and by ``get_video_features`` in 5.25; the prompt's layout is the same.
# ``generate`` in 5.25 (not 5.17) encodes the media before the prefill (``_prepare_multimodal_encoder_kwargs_for_
#   generation``) and passes the core ``mm_encoder_outputs`` ({"image": ..., "video": ...}, each with
#   ``pooler_output``: per image its packed features, per video its frames' and newline's) instead of the pixels and
#   ``image_sizes``; vtexit.core.anyres_grid reads the layout off those features then.
def anyres_helpers(model_type: str) -> tuple[Callable, Callable]:
    """``(get_anyres_image_grid_shape, unpad_image)`` of the modeling file of ``model_type`` (llava_next or
    llava_onevision)."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return module.get_anyres_image_grid_shape, module.unpad_image
