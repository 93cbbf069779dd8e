"""The vLLM model classes for Qwen2.5-VL and Qwen2-VL: vLLM's own classes, with each image's merged visual tokens
reduced by a vtexit pre-LLM method (pool, divprune, visionzip) before they fill the prompt. One set of mixins serves
both (vLLM's two classes share the methods used here). VisionZip scores each merged token in vLLM's vision tower, by
the transformers path's ``QwenGroups`` fed from the last full-attention block's attention input.

Counts: vLLM fixes each image's placeholder count in the front-end processor, before the encoder runs, so the kept
count is content-free: the method's count for the image's grid of merged tokens (:meth:`ImageReduction.grid_count`).

Positions, as vtexit's transformers path gives them (the full prompt's M-RoPE columns of the kept tokens): each kept
token keeps its original (t, h, w) position, and the text keeps the positions of the full prompt (text after an image
continues from the image's full grid). The text's positions and the decode offset are content-free, so
:meth:`get_mrope_input_positions` gives them when the request arrives, with every slot of an image at the image's
first position. Which grid place a slot holds is known only once the encoder ran: :meth:`embed_multimodal` appends
each kept token's (t, h, w) offset on its grid as three extra channels, :meth:`embed_input_ids` takes them off the
step's rows, and :meth:`forward` adds them to the positions of the step's image slots. vLLM's own hook for this
(``recompute_mrope_positions``) is not used: vLLM 0.32's CPU model runner never calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import torch

from vtexit.integrations.vllm import compat, tower_compat
from vtexit.integrations.vllm.reduction import ImageReduction
from vtexit.integrations.vllm.withdrawal import WithdrawalMixin, split_setting
from vtexit.methods.visionzip.towers import QwenGroups

QWEN2_5_VL = "VtexitQwen2_5_VLForConditionalGeneration"
OFFSET_CHANNELS = 3  # (t, h, w) of a kept token on its image's grid, appended to its embedding row


def qwen_reduction(hf_config: Any) -> ImageReduction:
    """The method named by the model config's ``vtexit`` entry (set with ``hf_overrides``); ValueError if none or if
    it is not one this class runs (pool, divprune, visionzip)."""
    setting = getattr(hf_config, "vtexit", None)
    if setting is None:
        architecture = (getattr(hf_config, "architectures", None) or [QWEN2_5_VL])[0]
        raise ValueError(
            f"{architecture} needs a method: pass hf_overrides={{'architectures': ['{architecture}'], "
            "'vtexit': {'method': 'divprune', 'keep': 0.25}}"
        )
    return ImageReduction.from_setting(split_setting(setting)[0])  # vtw: every visual token enters the LLM


def _refuse_video(method: str) -> ValueError:
    return ValueError(
        f"vtexit's vLLM plugin ({method}) reduces images on Qwen-VL models; video inputs are not supported (they "
        "would run at full length): pass images, or serve the model without the plugin's architecture"
    )


class VtexitQwenVLProcessingInfo:
    """Mixin for a Qwen-VL processing info: images only, each image's placeholder count the method's kept count."""

    @cached_property
    def vtexit_reduction(self) -> ImageReduction:
        return qwen_reduction(self.get_hf_config())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0:
            raise _refuse_video(self.vtexit_reduction.method)
        super().validate_num_items(modality, num_items)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}

    def get_num_image_tokens(
        self, *, image_width: int, image_height: int, image_processor: Any, mm_kwargs: Mapping[str, object]
    ) -> int:
        size, _ = self._get_vision_info(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        config = self.get_hf_config().vision_config
        unit = config.patch_size * config.spatial_merge_size
        return self.vtexit_reduction.grid_count(size.height // unit, size.width // unit)

    def get_max_image_tokens(self) -> int:
        """The unreduced count of the largest image (an upper bound of every reduced count: vLLM sizes its encoder
        cache and profiling from it)."""
        width, height = self.get_image_size_with_most_features()
        _, tokens = self._get_vision_info(
            image_width=width, image_height=height, image_processor=self.get_image_processor(), mm_kwargs={}
        )
        return tokens


class VtexitQwenVLMultiModalProcessor:
    """Mixin for a Qwen-VL processor: each image's pad token repeated the kept count; refuses precomputed image
    embeddings and videos."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
        reduction = self.info.vtexit_reduction
        if compat.video_counts(mm_items):
            raise _refuse_video(reduction.method)
        if compat.image_counts(mm_items) and isinstance(
            mm_items.get_items("image", object), compat.ImageEmbeddingItems
        ):
            raise ValueError(
                f"vtexit's vLLM plugin ({reduction.method}) reduces the images its vision tower encodes; precomputed "
                "image embeddings are not supported, pass the images"
            )
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality != "image":
                continue
            full = update.replacement

            def replacement(item: int, full: Any = full) -> list[int]:
                token = full(item)[0]
                _, height, width = compat.item_grid_thw(out_mm_kwargs, "image", item)
                return [token] * reduction.grid_count(height // merge, width // merge)

            updates.append(compat.PromptReplacement(modality="image", target=update.target, replacement=replacement))
        return updates


class VtexitQwenVLModel(WithdrawalMixin):
    """Mixin for vLLM's Qwen-VL model class: each image's merged tokens reduced by the configured pool or divprune,
    kept tokens at their original (t, h, w) positions, the text at the full prompt's (see the module docstring).
    ``{"method": "vtw", "layer": K}`` (or a hybrid whose in-LLM step is vtw) withdraws the visual tokens in the
    decoder from layer K on, the text rows keeping their M-RoPE positions (:mod:`vtexit.integrations.vllm.withdrawal`).
    """

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        compat.warn_if_untested()
        reduction = qwen_reduction(vllm_config.model_config.hf_config)
        limits = compat.multimodal_limits(vllm_config)
        if reduction.one_image_per_prompt and limits["image"] > 1:
            raise ValueError(
                f"{reduction.method} chooses among all the visual tokens of a prompt, and vLLM fixes each image's "
                "token count before the encoder runs: it runs with one image per prompt. Pass "
                "limit_mm_per_prompt={'image': 1} (vllm serve: --limit-mm-per-prompt '{\"image\": 1}')"
            )
        if compat.video_pruning_rate(vllm_config) > 0:
            raise ValueError(f"vtexit's vLLM plugin ({reduction.method}) does not run with video_pruning_rate (EVS)")
        if compat.pipeline_parallel_size(vllm_config) > 1:
            raise ValueError(
                "vtexit's vLLM plugin on Qwen-VL models places the kept tokens' positions on the first pipeline stage: "
                "pipeline parallelism is not supported (tensor parallelism is)"
            )
        if compat.speculative_decoding(vllm_config):
            raise ValueError(
                f"vtexit's vLLM plugin ({reduction.method}) on Qwen-VL models runs without speculative decoding"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtexit_reduction = reduction
        self._vtexit_step: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_withdrawal(vllm_config, split_setting(vllm_config.model_config.hf_config.vtexit)[1])

    def get_encoder_cudagraph_config(self) -> Any:
        """vLLM's encoder CUDA graphs run the tower without :meth:`embed_multimodal` (no reduction): off."""
        return compat.without_encoder_cudagraphs(super().get_encoder_cudagraph_config())

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        """Per image: its kept tokens (kept, dim + 3), each row followed by its (t, h, w) offset on the image's grid."""
        image_input, video_input = compat.image_and_video_inputs(self, kwargs)
        if video_input is not None:
            raise _refuse_video(self.vtexit_reduction.method)
        if image_input is None:
            return ()
        if image_input["type"] != "pixel_values":
            raise ValueError("vtexit's vLLM plugin does not take precomputed image embeddings")
        merge = self.visual.spatial_merge_size
        grid = image_input["image_grid_thw"]
        if self.vtexit_reduction.in_tower:
            embeds, scored = self._vtexit_encode_and_score(image_input)
        else:
            embeds, scored = self._process_image_input(image_input), [(None, None)] * len(grid)
        out = []
        for features, (_, height, width), (scores, keys) in zip(embeds, grid.tolist(), scored, strict=True):
            rows, cols = height // merge, width // merge
            exact = 2 / torch.finfo(features.dtype).eps  # integers up to this are exact in the embedding dtype
            if max(rows, cols) > exact:
                raise ValueError(f"an image of {rows} x {cols} merged tokens is too large for {features.dtype} rows")
            kept, index = self.vtexit_reduction.reduce_grid(features, rows, cols, scores, keys)
            offsets = torch.stack([torch.zeros_like(index), index // cols, index % cols], dim=1)
            out.append(torch.cat([kept, offsets.to(kept.dtype)], dim=1))
        return tuple(out)

    def _vtexit_encode_and_score(self, image_input: Any) -> tuple[tuple[torch.Tensor, ...], list[tuple]]:
        """VisionZip: the merger's output per image and each image's (scores, keys) per merged token, in prompt
        order, from the last full-attention block's input, by the transformers path's ``QwenGroups``."""
        block = tower_compat.qwen_scored_block(self.visual)
        vision = self.config.vision_config
        full = getattr(vision, "fullatt_block_indexes", None)
        source = QwenGroups(
            model_type=self.config.model_type,
            tower=SimpleNamespace(config=vision),  # 2.5-VL: the window order from the vision config
            block=tower_compat.QwenBlockView(block),
            heads=vision.num_heads,
            unit=vision.spatial_merge_size**2,
            windowed=full is not None,
        )
        with tower_compat.qwen_block_calls(block) as calls:
            embeds = self._process_image_input(image_input)
        if len(calls) != 1:
            raise ValueError(
                f"visionzip needs the vision tower to run once for the step's images, it ran {len(calls)} times (an "
                "encoder sharded over data-parallel ranks is not supported)"
            )
        grid = image_input["image_grid_thw"]
        scores, keys = source.scores_and_keys(grid.cpu(), *calls[0])
        sizes = [features.shape[0] for features in embeds]
        return embeds, list(zip(scores.split(sizes), keys.split(sizes), strict=True))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor] | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """vLLM's embedding of the step's tokens, the image rows without their offsets; the offsets wait for
        :meth:`forward`, which the runner calls next on the same tokens."""
        self._vtexit_step = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            rows = torch.cat([m[:, -OFFSET_CHANNELS:] for m in multimodal_embeddings]).round().long()
            multimodal_embeddings = [m[:, :-OFFSET_CHANNELS] for m in multimodal_embeddings]
            self._vtexit_step = (is_multimodal, rows)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        step, self._vtexit_step = self._vtexit_step, None
        if step is not None:
            is_multimodal, offsets = step
            slots = is_multimodal.nonzero().squeeze(1).to(positions.device)
            if slots.numel() != offsets.shape[0]:
                raise RuntimeError(f"{slots.numel()} image slots in the step, {offsets.shape[0]} rows")
            positions = positions.clone()
            positions[:, slots] += offsets.T.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The text's positions of the full prompt, every slot of an image at its first grid position (:meth:`forward`
        adds each kept token's offset), and the decode offset of the full prompt."""
        columns: list[torch.Tensor] = []
        start = 0  # next prompt index
        position = 0  # next text position
        for offset, frames, rows, cols, _ in self.iter_mm_grid_thw(mm_features):
            if frames != 1:
                raise ValueError("vtexit's vLLM plugin on Qwen-VL models takes images only")
            columns.append(torch.arange(position, position + offset - start))
            position += offset - start
            kept = self.vtexit_reduction.grid_count(rows, cols)
            columns.append(torch.full((kept,), position))
            position += max(frames, rows, cols)  # text after the image continues from its full grid
            start = offset + kept
        columns.append(torch.arange(position, position + len(input_tokens) - start))
        position += len(input_tokens) - start
        flat = torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long)
        return flat.long().unsqueeze(0).expand(3, -1).clone(), position - len(input_tokens)


class VtexitQwen2_5_VLProcessingInfo(VtexitQwenVLProcessingInfo, compat.Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info, reduced counts."""


class VtexitQwen2_5_VLMultiModalProcessor(VtexitQwenVLMultiModalProcessor, compat.Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor, reduced counts."""


@compat.MULTIMODAL_REGISTRY.register_processor(
    VtexitQwen2_5_VLMultiModalProcessor,
    info=VtexitQwen2_5_VLProcessingInfo,
    dummy_inputs=compat.Qwen2_5_VLDummyInputsBuilder,
)
class VtexitQwen2_5_VLForConditionalGeneration(VtexitQwenVLModel, compat.Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with each image's visual tokens reduced by a vtexit method."""


class VtexitQwen2VLProcessingInfo(VtexitQwenVLProcessingInfo, compat.Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info, reduced counts."""


class VtexitQwen2VLMultiModalProcessor(VtexitQwenVLMultiModalProcessor, compat.Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor, reduced counts."""


@compat.MULTIMODAL_REGISTRY.register_processor(
    VtexitQwen2VLMultiModalProcessor,
    info=VtexitQwen2VLProcessingInfo,
    dummy_inputs=compat.Qwen2VLDummyInputsBuilder,
)
class VtexitQwen2VLForConditionalGeneration(VtexitQwenVLModel, compat.Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with each image's visual tokens reduced by a vtexit method."""
