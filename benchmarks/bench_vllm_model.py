"""bench_vllm's model: the LLaVA-1.5-shaped config-only folder (CPU or 7B shape) vLLM loads with dummy weights, its
language model's shape for the FLOPs count, and the request images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vtexit.core.flops import DecoderShape


@dataclass(frozen=True)
class Shape:
    """The model folder's shape: the vision tower and the language model."""

    name: str
    image_size: int
    patch: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int | None  # None: the tiny tokenizer's vocabulary
    dtype: str


CPU_SHAPE = Shape("LLaVA-1.5-shaped small (CPU)", 336, 14, 128, 2, 4, 512, 576, 8, 9, 3, 1536, None, "float32")
GPU_SHAPE = Shape(
    "LLaVA-1.5-7B shape (CLIP-L/336 + Vicuna-7B)",
    336,
    14,
    1024,
    24,
    16,
    4096,
    4096,
    32,
    32,
    32,
    11008,
    32000,
    "float16",
)


def write_model_folder(folder: Path, shape: Shape) -> Path:
    """A config-only LLaVA folder vLLM loads with ``load_format="dummy"``: config.json, the tiny word-level
    processor (its image processor at the tower's size) and the chat template. No weights."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from vtexit.testing.tiny_folder import CHAT_TEMPLATE, IMAGE_TOKEN, make_tokenizer
    from vtexit.testing.vocab import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB_SIZE, Vocab

    text = LlamaConfig(
        vocab_size=shape.vocab or TINY_VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ffn,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch,
        projection_dim=shape.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=Vocab(TINY_VOCAB_SIZE).image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = shape.dtype
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    size = shape.image_size
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=make_tokenizer(),
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    ).save_pretrained(folder)
    return folder


def decoder_shape(folder: Path) -> DecoderShape:
    """The language model's shape from the folder's config (Llama-style decoders: gated MLP)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder).get_text_config()
    gated = text.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
    return DecoderShape.from_config(text, gated=gated)


def make_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
