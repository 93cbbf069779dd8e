"""Models and inputs for the CLI: the built-in default model, a tiny random LLaVA, or a local model folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BUILTIN = ("default", "tiny")


@dataclass
class ModelSource:
    """A loaded model and a way to make input batches for it from easy-vqa (or random ids for ``tiny``)."""

    name: str
    model: nn.Module
    make_batches: Callable[[int, int, str, int], list[dict[str, torch.Tensor]]]  # (rows, batch size, split, seed)
    processor: object | None = None
    prompt: Callable[[str], str] | None = None  # question -> prompt text with the image placeholder


def load_source(spec: str, *, attn_implementation: str = "sdpa") -> ModelSource:
    """``default`` (mini-LLaVA from PyPI parts), ``tiny`` (random LLaVA), or a path to a saved model folder."""
    if spec == "tiny":
        return _tiny(attn_implementation)
    if spec == "default":
        from vtexit.default_model import build_prompt, load_default

        model, processor = load_default(attn_implementation=attn_implementation)
        return ModelSource(
            "default (mini-LLaVA)", model, _vqa_batches(processor, build_prompt), processor, build_prompt
        )
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be one of {list(BUILTIN)} or an existing model folder, got {spec!r}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation).eval()
    processor = AutoProcessor.from_pretrained(path)
    prompt = _chat_prompt(processor)
    return ModelSource(str(path), model, _vqa_batches(processor, prompt), processor, prompt)


def _tiny(attn_implementation: str) -> ModelSource:
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny("llava", attn_implementation=attn_implementation, num_layers=8)

    def make(rows: int, batch_size: int, split: str, seed: int) -> list[dict[str, torch.Tensor]]:
        sizes = [min(batch_size, rows - i) for i in range(0, rows, batch_size)]
        return [
            case.inputs([1] * n, text_len=[4 + (seed + b + j) % 5 for j in range(n)], seed=seed + b)
            for b, n in enumerate(sizes)
        ]

    return ModelSource("tiny random LLaVA", case.model, make)


def _chat_prompt(processor) -> Callable[[str], str]:
    def prompt(question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return prompt


def _vqa_batches(processor, prompt: Callable[[str], str]):
    from PIL import Image

    from vtexit.evaluation.datasets import EasyVQA
    from vtexit.evaluation.datasets.select import fixed_subset

    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"

    def make(rows: int, batch_size: int, split: str, seed: int) -> list[dict[str, torch.Tensor]]:
        records = fixed_subset(EasyVQA(split), rows, seed)
        batches = []
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = [Image.open(r.image_path).convert("RGB") for r in chunk]
            batches.append(
                dict(
                    processor(
                        images=images, text=[prompt(r.question) for r in chunk], return_tensors="pt", padding=True
                    )
                )
            )
        return batches

    return make
