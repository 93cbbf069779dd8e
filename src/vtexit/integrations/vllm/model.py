"""The vLLM model class: vLLM's own LLaVA, with each image's visual tokens reduced by a vtexit pre-LLM method before
they fill the prompt.

vLLM fixes the number of placeholder tokens per image in the front-end processor, before the encoder runs (it sizes
the KV cache and the positions), so the kept count is content-free: :class:`VtexitLlavaProcessingInfo` gives the
method's count for the encoder's count. Which tokens fill those slots is the method's own rule, applied per image by
vtexit's selection code (:mod:`vtexit.integrations.vllm.reduction`): to the projector's output in
:meth:`VtexitLlavaForConditionalGeneration._process_image_input` (pool, divprune; visionzip on SigLIP, from the
selected layer's attention, merging projected tokens as the transformers path does), or in the vision tower in
``_image_pixels_to_features`` (visionzip on CLIP and DINOv2, from the CLS token's attention in the selected layer).
The language model then sees the prompt vtexit's transformers path builds with renumbered positions.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from vtexit.integrations.vllm import compat, tower_compat
from vtexit.integrations.vllm.reduction import ImageReduction
from vtexit.integrations.vllm.towers import DINOV2_TOWERS, build_dinov2_tower
from vtexit.integrations.vllm.withdrawal import WithdrawalMixin, split_setting

CLIP_TOWERS = ("clip_vision_model",)
SIGLIP_TOWERS = ("siglip_vision_model",)  # no CLS token: VisionZip scores by the attention each patch receives
# DINOv2 (vtexit's default model): transformers' own module, which vLLM's LLaVA does not build.


def reduction_of(hf_config: Any) -> ImageReduction:
    """The method named by the model config's ``vtexit`` entry (set with ``hf_overrides``); ValueError if none."""
    setting = getattr(hf_config, "vtexit", None)
    if setting is None:
        raise ValueError(
            "VtexitLlavaForConditionalGeneration needs a method: pass hf_overrides={'architectures': "
            "['VtexitLlavaForConditionalGeneration'], 'vtexit': {'method': 'pool', 'stride': 2}}"
        )
    return ImageReduction.from_setting(split_setting(setting)[0])  # vtw: every visual token enters the LLM


class VtexitLlavaProcessingInfo(compat.LlavaProcessingInfo):
    """LLaVA's processing info with each image's placeholder count set to the method's kept count."""

    @cached_property
    def vtexit_reduction(self) -> ImageReduction:
        return reduction_of(self.get_hf_config())

    def get_vision_encoder_info(self):
        config = self.get_hf_config()
        if getattr(config.vision_config, "model_type", None) in DINOV2_TOWERS:
            size = compat.processor_image_size(self.get_hf_processor().image_processor)
            return compat.FixedSizeEncoderInfo(config, size)
        return super().get_vision_encoder_info()

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.vtexit_reduction.count(tokens)


class VtexitLlavaMultiModalProcessor(compat.LlavaMultiModalProcessor):
    """LLaVA's processor, refusing precomputed image embeddings (the plugin reduces what the tower encodes)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        reduction = self.info.vtexit_reduction
        if compat.image_counts(mm_items):
            images = mm_items.get_items("image", object)
            if isinstance(images, compat.ImageEmbeddingItems):
                raise ValueError(
                    f"vtexit's vLLM plugin ({reduction.method}) reduces the images its vision tower encodes; "
                    "precomputed image embeddings are not supported, pass the images"
                )
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


@compat.MULTIMODAL_REGISTRY.register_processor(
    VtexitLlavaMultiModalProcessor,
    info=VtexitLlavaProcessingInfo,
    dummy_inputs=compat.LlavaDummyInputsBuilder,
)
class VtexitLlavaForConditionalGeneration(WithdrawalMixin, compat.LlavaForConditionalGeneration):
    """vLLM's LLaVA with a vtexit pre-LLM method (``pool``, ``divprune`` or ``visionzip``; ``none`` keeps every
    token) on each image's visual tokens. Towers: CLIP (``vision_feature_select_strategy="default"``), SigLIP
    (``"full"``), or DINOv2 (``"default"``), which the plugin builds from transformers' ``Dinov2Model`` (vLLM's LLaVA
    has no DINOv2 tower). ``{"method": "vtw", "layer": K}`` (or a hybrid whose in-LLM step is vtw) withdraws the
    visual tokens in the decoder from layer K on (:mod:`vtexit.integrations.vllm.withdrawal`)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        compat.warn_if_untested()
        config = vllm_config.model_config.hf_config
        reduction = reduction_of(config)  # refuse a missing or unsupported method before building anything
        tower = getattr(config.vision_config, "model_type", None)
        if tower not in CLIP_TOWERS + SIGLIP_TOWERS + DINOV2_TOWERS:
            raise ValueError(
                "vtexit's vLLM plugin supports LLaVA-1.5-style models with a CLIP, SigLIP or DINOv2 vision tower; "
                f"this one has {tower!r}"
            )
        strategy = config.vision_feature_select_strategy
        image_size = config.vision_config.image_size
        if tower in DINOV2_TOWERS:
            if strategy != "default":
                raise ValueError(
                    "vtexit's vLLM plugin needs vision_feature_select_strategy='default' with a DINOv2 tower (the CLS "
                    f"token is not a prompt token), got {strategy!r}"
                )
            # DINOv2's config gives its position grid's size (518); the images are the processor's size.
            image_size = compat.model_image_size(vllm_config)
        elif tower in SIGLIP_TOWERS:
            if strategy != "full":
                raise ValueError(
                    "vtexit's vLLM plugin needs vision_feature_select_strategy='full' with a SigLIP tower (it has no "
                    f"CLS token; 'default' would drop a patch), got {strategy!r}"
                )
        elif strategy != "default":
            raise ValueError(
                "vtexit's vLLM plugin needs vision_feature_select_strategy='default' with a CLIP tower (the CLS token "
                f"is not a prompt token), got {strategy!r}"
            )
        side = image_size // config.vision_config.patch_size
        reduction.check_tokens(side * side)
        if reduction.in_tower:
            layer, count = config.vision_feature_layer, config.vision_config.num_hidden_layers
            if not isinstance(layer, int) or not -(count + 1) <= layer <= count or layer % (count + 1) == 0:
                raise ValueError(
                    f"{reduction.method} needs one vision_feature_layer that is a tower layer's output "
                    f"(1..{count} or -{count}..-1), got {layer!r}"
                )
        if reduction.one_image_per_prompt and compat.image_limit(vllm_config) > 1:
            raise ValueError(
                f"{reduction.method} chooses among all the visual tokens of a prompt, and vLLM fixes each image's "
                "token count before the encoder runs: it runs with one image per prompt. Pass "
                "limit_mm_per_prompt={'image': 1} (vllm serve: --limit-mm-per-prompt '{\"image\": 1}')"
            )
        if tower in DINOV2_TOWERS:
            with compat.llava_vision_tower(build_dinov2_tower):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
        else:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtexit_reduction = reduction
        self.vtexit_image_size = image_size
        self.vtexit_tower = tower
        self.init_withdrawal(vllm_config, split_setting(config.vtexit)[1])

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        if getattr(self.config.vision_config, "model_type", None) not in DINOV2_TOWERS:
            return super()._parse_and_validate_image_input(**kwargs)
        # vLLM's LLaVA checks pixels against vision_config.image_size, DINOv2's position grid (518); they are the
        # processor's size
        pixel_values = kwargs.pop("pixel_values", None)
        if kwargs.pop("image_embeds", None) is not None:
            raise ValueError("vtexit's vLLM plugin does not take precomputed image embeddings")
        if pixel_values is None:
            return None
        size = self.vtexit_image_size
        return compat.LlavaImagePixelInputs(
            type="pixel_values", pixel_values=pixel_values, resolve_bindings={"h": size, "w": size}
        )

    def _image_pixels_to_features(self, vision_tower: Any, pixel_values: Any) -> Any:
        if not self.vtexit_reduction.in_tower or self.vtexit_tower in SIGLIP_TOWERS:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        if self.vtexit_tower in DINOV2_TOWERS:
            return self.vtexit_reduction.zip_cls(*vision_tower.visionzip_inputs(pixel_values))
        features, query, keys, heads = tower_compat.clip_selected_layer(vision_tower, pixel_values)
        return self.vtexit_reduction.zip_tower(features, query, keys, heads)

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(image_input, compat.LlavaImageEmbeddingInputs):
            raise ValueError("vtexit's vLLM plugin does not take precomputed image embeddings")
        if self.vtexit_reduction.in_tower and self.vtexit_tower in SIGLIP_TOWERS:
            # no CLS token: the transformers path keeps each image's tokens in place and merges projected ones
            pixels = image_input["pixel_values"]
            features, hidden, *layer = tower_compat.siglip_selected_layer(self.vision_tower, pixels)
            return self.vtexit_reduction.zip_patches(self.multi_modal_projector(features), hidden, *layer)
        embeds = super()._process_image_input(image_input)
        return tuple(self.vtexit_reduction.reduce(image) for image in embeds)
