"""Entry points: build a tiny model of a family (`build_tiny`) or a LLaVA-shaped one for benchmarks."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)

from vtexit.testing.case import TinyCase
from vtexit.testing.config_kwargs import INIT_STD, VISION_HIDDEN, special_ids_kwargs, vit_kwargs
from vtexit.testing.families import family_by_name
from vtexit.testing.families.llava import LlavaInputSpec
from vtexit.testing.input_spec import InputSpec
from vtexit.testing.vocab import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB_SIZE, Vocab

__all__ = ["build_llava_shaped", "build_tiny"]


def instantiate(
    cls: type[PreTrainedModel], config: PretrainedConfig, attn_implementation: str, seed: int
) -> PreTrainedModel:
    """Build in float32 on CPU with a private RNG stream (the caller's global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def randomise_zero_inits(model: PreTrainedModel, seed: int) -> None:
    """Re-draw parameters that transformers initialises to zero but that must not be zero here.

    Gemma 3 zero-initialises its multimodal projection, which would turn every image into the
    same all-zero embedding: the visual tokens would carry no information at all.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, INIT_STD)


def make_case(name: str, model: PreTrainedModel, vocab: Vocab, spec_cls: type[InputSpec]) -> TinyCase:
    """Wrap a built model: set its generation ids and pair it with the family's input builder."""
    spec = spec_cls(model.config, vocab)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    # Never *generate* a media/special id: a generated placeholder would look like a visual token
    # to anything that scans input_ids (including the engine under test).
    gc.suppress_tokens = sorted(vocab.specials - {EOS_ID})
    return TinyCase(
        name=name,
        model=model,
        image_token_id=vocab.image,
        video_token_id=vocab.video if spec.supports_video else None,
        pad_token_id=PAD_ID,
        special_token_ids=vocab.specials,
        text_id_range=vocab.text_range,
        _spec=spec,
    )


def build_tiny(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 4,
    **overrides: Any,
) -> TinyCase:
    """Build the tiny model of family `name` (one of `FAMILIES`).

    `overrides` are config kwargs: ``text_config={...}`` and ``vision_config={...}`` are merged into
    the sub-configs, everything else into the top-level config, e.g.
    ``build_tiny("qwen3_vl", vision_config={"deepstack_visual_indexes": [1]})``.
    """
    family = family_by_name(name)
    top = dict(overrides)
    text = dict(top.pop("text_config", None) or {})
    vision = dict(top.pop("vision_config", None) or {})
    vocab = Vocab(TINY_VOCAB_SIZE)
    config = family.build_config(num_layers, vocab, text, vision, top)
    model = instantiate(family.model_class, config, attn_implementation, seed)
    randomise_zero_inits(model, seed)
    return make_case(name, model, vocab, family.input_spec)


def build_llava_shaped(
    hidden_size: int = 1024,
    num_layers: int = 16,
    image_tokens: int = 576,
    *,
    num_heads: int = 16,
    num_kv_heads: int | None = None,
    intermediate_size: int = 2816,
    vocab_size: int = 4096,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> TinyCase:
    """A LLaVA-1.5-shaped language model (Llama, gated MLP, no GQA by default) behind a deliberately
    tiny CLIP tower whose 14-pixel patches give exactly `image_tokens` tokens per image.

    For benchmarks: decoder cost is realistic for its size while the vision tower costs ~nothing.
    The vocabulary is kept small by default (4096) to save memory; pass 32000 for LLaVA's.
    """
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"image_tokens must be a perfect square, got {image_tokens}")
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    vocab = Vocab(vocab_size)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max(4096, 2 * image_tokens),
        tie_word_embeddings=False,
        **special_ids_kwargs(),
    )
    vision = CLIPVisionConfig(**{**vit_kwargs(side * 14, 14), "projection_dim": VISION_HIDDEN})
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab.image,
        image_seq_length=image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = instantiate(LlavaForConditionalGeneration, config, attn_implementation, seed)
    return make_case("llava", model, vocab, LlavaInputSpec)
