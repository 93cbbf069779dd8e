"""The DyVTE gates trained for the default model, shipped in the package beside its weights.

How they were made (command, seed, steps, wall time) is recorded in ``weights/dyvte_gates/TRAINING.md``.
"""

from __future__ import annotations

from pathlib import Path

from vtexit.default_model.adapter import WEIGHTS_DIR
from vtexit.methods.dyvte.gates import DyVTEGates

GATES_DIR = WEIGHTS_DIR / "dyvte_gates"


def load_default_gates(folder: Path = GATES_DIR) -> DyVTEGates:
    """The gates trained for ``load_default()``'s model: ``vtexit.dyvte(model, load_default_gates())``."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the default DyVTE gates are not at {folder}; reinstall vtexit, or train them again with "
            "`vtexit train-gates` (see the README's DyVTE section)"
        )
    return DyVTEGates.from_pretrained(folder)
