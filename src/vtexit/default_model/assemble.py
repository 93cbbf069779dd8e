"""Put the converted parts together as a standard ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

Everything here is plain transformers so that code written for real LLaVA checkpoints (hooks on decoder
layers, ``generate``, processors) works unchanged on the default model.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPImageProcessorPil,
    Dinov2Model,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from vtexit.default_model.prompt import CHAT_TEMPLATE, IMAGE_TOKEN

IMAGE_SIZE = 112
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64: the CLS token is dropped ("default" strategy)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_SEED = 0  # the untrained projector is still deterministic


# Batched generate appends each row's next token after its last position: rows must end with their last real token,
# so the processor pads on the left. (Training batches are padded by their own collate, on the right.)
LEFT = "left"


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register ``<image>`` as a special token and return its id (49152: just past SmolLM2's vocab)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def grow_vocab(lm: LlamaForCausalLM, vocab_size: int) -> None:
    """Resize embeddings to fit new tokens; new rows get the mean embedding (deterministic, unlike the
    sampled default of ``resize_token_embeddings``)."""
    old = lm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    weight = lm.get_input_embeddings().weight
    with torch.no_grad():
        weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def make_image_processor() -> CLIPImageProcessorPil:
    """PIL/numpy image processor (torchvision is not needed): resize + crop to 112 px, ImageNet normalisation."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def make_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """A ``LlavaProcessor`` that expands each ``<image>`` into exactly 64 image tokens; batches pad on the left."""
    add_image_token(tokenizer)
    tokenizer.padding_side = LEFT
    return LlavaProcessor(
        image_processor=make_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's CLS; "default" then removes it again
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def llava_config(vision: Dinov2Model, lm: LlamaForCausalLM, image_token_id: int) -> LlavaConfig:
    return LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=NUM_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )


def assemble_llava(
    vision: Dinov2Model, lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the LLaVA from converted parts; the projector gets a seeded random init (trained later)."""
    processor = make_processor(tokenizer)
    image_token_id = processor.image_token_id
    grow_vocab(lm, len(processor.tokenizer))
    config = llava_config(vision, lm, image_token_id)
    torch.manual_seed(PROJECTOR_SEED)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), processor
