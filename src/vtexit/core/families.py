"""A few lines that describe where a model family keeps its decoder, instead of a forward per family.

vtexit attaches to a model through forward pre-hooks on two modules: the multimodal core (which sees
``input_ids``, pixel inputs, the cache and the 2D padding mask) and each decoder layer of the language model.
A :class:`FamilySpec` says where those modules are and which config attributes hold the media token ids.
Describe a new family with :func:`register_family` or pass ``family=FamilySpec(...)`` to a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from vtexit.core.anyres_grid import anyres_grid
from vtexit.core.grids import (
    gemma3_grid,
    idefics3_grid,
    internvl_grid,
    merged_patch_media_count,
    qwen_grid,
    square_grid,
    square_media_count,
)


def first_layer_of_each_type(text_config: PretrainedConfig) -> int:
    """Smallest K that leaves the first layer of every attention type untouched.

    transformers sizes masks and default positions from the cache of the first layer of each type (layer 0,
    or the first full/sliding layer of hybrid models), so those layers must keep the full sequence.
    """
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    firsts = {}
    for i, kind in enumerate(layer_types):
        firsts.setdefault(kind, i)
    return max(firsts.values()) + 1


def deepstack_min_layer(config: PretrainedConfig) -> int:
    """Qwen3-VL adds visual features to the first few layers' outputs with a full-length mask."""
    indexes = getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or []
    return max(first_layer_of_each_type(config.get_text_config()), len(indexes))


def default_min_layer(config: PretrainedConfig) -> int:
    return first_layer_of_each_type(config.get_text_config())


@dataclass(frozen=True)
class FamilySpec:
    """Where a multimodal model keeps the modules vtexit hooks, as dotted attribute paths."""

    name: str
    model_types: tuple[str, ...]
    core: str = "model"
    language_model: str = "model.language_model"
    layers: str = "layers"  # relative to language_model
    final_norm: str = "norm"  # relative to language_model
    media_token_attrs: tuple[str, ...] = ("image_token_id", "video_token_id")
    min_layer: Callable[[PretrainedConfig], int] = field(default=default_min_layer)
    attention: str = "self_attn"  # attention module of a decoder layer (for attention scores)
    # Core kwarg with per-token types (1 = media) for families whose media blocks attend both ways (Gemma3).
    media_blocks: str | None = None
    # Where each visual token sits on its image's patch grid (see vtexit.core.grids), for windowed methods; None
    # when the family's layout is not described. ``grid_inputs`` names the core kwargs it reads.
    visual_grid: Callable | None = None
    grid_inputs: tuple[str, ...] = ()
    # ``(config, core kwargs) -> int | None``: the batch's visual tokens from its pixel inputs' shapes (no device
    # read), which lets a compiled batch-1 prefill plan a withdrawal while tracing; None when not known.
    media_count: Callable | None = None

    def media_token_ids(self, config: PretrainedConfig) -> list[int]:
        ids = [getattr(config, attr, None) for attr in self.media_token_attrs]
        return sorted({int(i) for i in ids if i is not None})

    def media_mask(self, config: PretrainedConfig, input_ids: torch.Tensor) -> torch.Tensor:
        """True where ``input_ids`` holds a media (visual) placeholder token. Only valid on prompts: a generated
        token may equal a media id."""
        ids = torch.tensor(self.media_token_ids(config), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def resolve(self, model: nn.Module) -> ResolvedFamily:
        try:
            core = _get_path(model, self.core)
            language_model = _get_path(model, self.language_model)
            layers = _get_path(language_model, self.layers)
            norm = _get_path(language_model, self.final_norm)
        except AttributeError as err:
            raise ValueError(
                f"model does not match family {self.name!r}: {err}. Pass family=FamilySpec(...) with the right paths."
            ) from None
        return ResolvedFamily(spec=self, core=core, language_model=language_model, layers=list(layers), norm=norm)


@dataclass(frozen=True)
class ResolvedFamily:
    """A family's modules found on one model instance."""

    spec: FamilySpec
    core: nn.Module
    language_model: nn.Module
    layers: list[nn.Module]
    norm: nn.Module


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {path!r})")
        obj = getattr(obj, part)
    return obj


_QWEN_GRID = {
    "visual_grid": qwen_grid,
    "grid_inputs": ("image_grid_thw", "video_grid_thw", "position_ids"),
    "media_count": merged_patch_media_count,
}

# Anyres: the base frame and the unpadded high-res grid of each image, from image_sizes (and OneVision's images per
# row and video frames), or in generate from the media features encoded before the prefill.
_ANYRES_GRID = {
    "visual_grid": anyres_grid,
    "grid_inputs": ("image_sizes", "batch_num_images", "pixel_values", "pixel_values_videos", "mm_encoder_outputs"),
}

_BUILTIN = (
    FamilySpec(
        "llava",
        ("llava",),
        media_token_attrs=("image_token_id",),
        visual_grid=square_grid,
        media_count=square_media_count,
    ),
    FamilySpec("llava_next", ("llava_next",), media_token_attrs=("image_token_id",), **_ANYRES_GRID),
    FamilySpec("llava_onevision", ("llava_onevision",), **_ANYRES_GRID),
    FamilySpec("qwen2_vl", ("qwen2_vl",), **_QWEN_GRID),
    FamilySpec("qwen2_5_vl", ("qwen2_5_vl",), **_QWEN_GRID),
    FamilySpec("qwen3_vl", ("qwen3_vl",), min_layer=deepstack_min_layer, **_QWEN_GRID),
    FamilySpec("internvl", ("internvl",), media_token_attrs=("image_token_id",), visual_grid=internvl_grid),
    FamilySpec(
        "idefics3",
        ("idefics3", "smolvlm"),
        language_model="model.text_model",
        media_token_attrs=("image_token_id",),
        visual_grid=idefics3_grid,
    ),
    FamilySpec(
        "gemma3",
        ("gemma3",),
        media_token_attrs=("image_token_id",),
        media_blocks="token_type_ids",
        visual_grid=gemma3_grid,
    ),
)

_REGISTRY: dict[str, FamilySpec] = {t: spec for spec in _BUILTIN for t in spec.model_types}


def builtin_families() -> tuple[FamilySpec, ...]:
    """The families vtexit describes out of the box (each tested on a tiny model, see vtexit.testing)."""
    return _BUILTIN


def register_family(spec: FamilySpec) -> None:
    """Make ``spec`` the description used for its ``model_types`` (static configuration, like AutoConfig)."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def family_for(model: nn.Module) -> FamilySpec:
    """The family description for ``model``, or a ValueError listing what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise ValueError(
        f"model type {model_type!r} is not a supported multimodal family. Supported: "
        f"{', '.join(supported_model_types())}. Describe a new family with "
        "vtexit.register_family(vtexit.FamilySpec(name, model_types, core=..., language_model=..., ...)) "
        "or pass family=FamilySpec(...); see the README section 'Adding a model family'."
    )
