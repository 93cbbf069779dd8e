"""The DyVTE gates trained for the default model (they ship with the method: :mod:`vtexit.methods.dyvte.shipped`)."""

from __future__ import annotations

from vtexit.methods.dyvte.shipped import GATES_DIR, load_default_gates

__all__ = ["GATES_DIR", "load_default_gates"]
