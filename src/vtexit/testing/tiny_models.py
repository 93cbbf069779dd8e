"""Kept so that ``from vtexit.testing.tiny_models import ...`` keeps working; see `vtexit.testing`.

The implementation lives in `build` (entry points), `case` (`TinyCase`), `families/` (one module
per family: config + input builder), `vocab`, `config_kwargs`, `input_spec` and `family`.
"""

from __future__ import annotations

from vtexit.testing.build import build_llava_shaped, build_tiny
from vtexit.testing.case import TinyCase
from vtexit.testing.families import FAMILIES

__all__ = ["FAMILIES", "TinyCase", "build_llava_shaped", "build_tiny"]
