"""The DyVTE gates trained for vtexit's built-in default model, shipped in the package (``default_gates/``).

How they were made (command, seed, steps, wall time) is recorded in ``default_gates/TRAINING.md``. They fit that
model only; for another model, train gates of its own (``vtexit train-gates`` or :func:`vtexit.train_gates`).
"""

from __future__ import annotations

from pathlib import Path

from vtexit.methods.dyvte.gates import DyVTEGates

GATES_DIR = Path(__file__).parent / "default_gates"


def load_default_gates(folder: Path = GATES_DIR) -> DyVTEGates:
    """The gates trained for ``load_default()``'s model: ``vtexit.dyvte(model, load_default_gates())``."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the default DyVTE gates are not at {folder}; reinstall vtexit, or train them again with "
            "`vtexit train-gates`"
        )
    return DyVTEGates.from_pretrained(folder)
