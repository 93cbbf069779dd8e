"""Test helpers: tiny, randomly initialised multimodal models built from the *real* transformers classes.

Why: the withdrawal engine hooks the decoder layers of real model classes, so its tests must run
against those classes (toy sizes, random weights) rather than mocks; that catches integration
errors (mask building, rope/position handling, caches, deepstack, ...) in seconds on a CPU.

Nothing is downloaded. Configs are written in `families/` (one module per family), and
`TinyCase.inputs` assembles token ids the way each family's processor would (placeholder expansion,
vision start/end wrappers, image grids, token-type ids, ...), so no tokenizer or processor is needed.
The token-id layout is described in `vocab`.
"""

from vtexit.testing.build import build_llava_shaped, build_tiny
from vtexit.testing.case import TinyCase
from vtexit.testing.families import FAMILIES

__all__ = ["FAMILIES", "TinyCase", "build_llava_shaped", "build_tiny"]
