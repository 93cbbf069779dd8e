"""Test helpers: tiny randomly initialised multimodal models and tokenizer-free input builders."""

from vtexit.testing.tiny_models import FAMILIES, TinyCase, build_llava_shaped, build_tiny

__all__ = ["FAMILIES", "TinyCase", "build_llava_shaped", "build_tiny"]
