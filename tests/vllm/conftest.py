"""The vLLM plugin's tests run in their own venv (`make test-vllm`, .venv-vllm); without vLLM each module skips
itself (see ``_vllm_available``)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """vLLM and torch raise FutureWarnings of their own on import and engine start (e.g. torch.distributed's
    reduce_op); the main suite's ``error::FutureWarning`` is meant for transformers deprecations vtexit calls, which
    the main suite checks."""
    for item in items:
        if "tests/vllm/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
