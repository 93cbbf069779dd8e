"""The vLLM plugin's tests run in their own venv (`make test-vllm`, .venv-vllm); without a tested vLLM their modules
are not collected at all (see ``_vllm_available``), and the report's header says why."""

from __future__ import annotations

import pytest
from _vllm_available import SKIP_REASON, VLLM_INSTALLED

collect_ignore_glob = [] if VLLM_INSTALLED else ["test_*.py"]


def pytest_report_header(config):
    return None if VLLM_INSTALLED else f"tests/vllm: {SKIP_REASON}"


def pytest_collection_modifyitems(config, items):
    """vLLM and torch raise FutureWarnings of their own on import and engine start (e.g. torch.distributed's
    reduce_op); the main suite's ``error::FutureWarning`` is meant for transformers deprecations vtexit calls, which
    the main suite checks."""
    for item in items:
        if "tests/vllm/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
