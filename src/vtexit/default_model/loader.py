"""Public entry point: the built-in "mini-LLaVA" (DINOv2-small + SmolLM2-135M-Instruct), built offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

from vtexit.default_model.adapter import ADAPTER_FILE, WEIGHTS_DIR, apply_adapter
from vtexit.default_model.assemble import LEFT, assemble_llava, make_image_processor
from vtexit.default_model.cache import CorruptCacheError, cached_folder
from vtexit.default_model.convert_lm import load_gguf_lm, load_gguf_tokenizer
from vtexit.default_model.convert_vision import load_onnx_dinov2

MODEL_SUBDIR = "model"
PROCESSOR_SUBDIR = "processor"
# LoRA factors tuned on top of the default weights with VTW active (scripts/tune_withdrawal.py, weights/TUNING.md).
TUNED_ADAPTER_FILE = WEIGHTS_DIR / "withdrawal_tuned_adapter.safetensors"
VARIANTS = ("default", "withdrawal-tuned")


def _build_base(folder: Path) -> None:
    """Convert the packaged GGUF LM and ONNX vision encoder and save the assembled base model."""
    vision = load_onnx_dinov2()
    tokenizer = load_gguf_tokenizer()
    lm = load_gguf_lm()
    model, processor = assemble_llava(vision, lm, tokenizer)
    model.save_pretrained(folder / MODEL_SUBDIR)
    processor.save_pretrained(folder / PROCESSOR_SUBDIR)


def base_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the converted base model, building it on first use (~30-60 s)."""
    return cached_folder(_build_base, cache_dir)


def load_default(
    variant: str = "default",
    *,
    trained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The default model in eval mode, float32, and its processor (which pads batches on the left, as batched
    ``generate`` needs).

    ``trained=False`` keeps the seeded random projector and the unmodified LM (the "untrained" baseline);
    ``trained=True`` loads the committed projector and merges the committed LoRA weights into the LM.
    ``variant="withdrawal-tuned"`` also merges the LoRA factors tuned with VTW active (K drawn per step), so the
    model tolerates an early withdrawal; ``"default"`` is the untuned baseline.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if variant != "default" and not trained:
        raise ValueError(f"variant={variant!r} is tuned from the trained weights; it needs trained=True")
    folder = base_folder(cache_dir)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            folder / MODEL_SUBDIR, dtype=torch.float32, attn_implementation=attn_implementation
        )
        processor = LlavaProcessor.from_pretrained(folder / PROCESSOR_SUBDIR)
    except (OSError, ValueError) as err:
        raise CorruptCacheError(
            f"Could not load the cached default model ({err}). Delete the folder {folder} and run again."
        ) from err
    processor.tokenizer.padding_side = LEFT  # for batched generate; caches built before this saved "right"
    if not isinstance(processor.image_processor, CLIPImageProcessorPil):
        # With torchvision installed transformers would pick its torchvision backend; keep the PIL one that the
        # projector was trained with, so pixels are identical on every machine.
        processor.image_processor = make_image_processor()
    if trained:
        apply_adapter(model, ADAPTER_FILE)
    if variant == "withdrawal-tuned":
        apply_adapter(model, TUNED_ADAPTER_FILE)
    model.eval()
    return model, processor
