"""DyVTE's settings (the gates folder and the exit threshold), named by text so a CLI or a saved run can give them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from vtexit.core.families import FamilySpec, family_for
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig, check_float, shown
from vtexit.methods.dyvte.gates import DyVTEGates
from vtexit.methods.dyvte.policy import DyVTEHandle, DyVTEPolicy
from vtexit.methods.dyvte.shipped import GATES_DIR, load_default_gates

DEFAULT_THRESHOLD = None  # the threshold saved with the gates (0.5 = logit(exit) > logit(stay), the public code's)
DEFAULT_GATES = "default"  # the gates shipped for the built-in default model


def check_threshold(threshold: object) -> float:
    """``threshold`` as a float, or a ValueError naming it: a real number in [0, 1]."""
    return check_float("threshold", threshold, low=0, high=1, what="exit when P(exit) > threshold")


def load_gates(gates: str) -> DyVTEGates:
    """``"default"`` (the gates shipped for the default model) or a folder written by ``save_pretrained``."""
    if not isinstance(gates, str):
        raise ValueError(f"gates must be 'default' or the path of a gates folder, got {shown(gates)}")
    if gates == DEFAULT_GATES:
        return load_default_gates()
    return DyVTEGates.from_pretrained(gates)


def build_dyvte_policy(
    model: nn.Module, gates: DyVTEGates, threshold: object, family: FamilySpec | None = None
) -> DyVTEPolicy:
    """Check ``gates`` and ``threshold`` against ``model`` (ValueError naming them) and make the policy.
    ``threshold=None`` uses the one saved with the gates."""
    if not isinstance(gates, DyVTEGates):
        raise ValueError(f"gates must be DyVTEGates (or a folder / 'default'), got {type(gates).__name__}")
    threshold = check_threshold(gates.config.threshold if threshold is None else threshold)
    family = family or family_for(model)
    try:
        gates.check_model(model, family)
    except ValueError as err:
        if not is_shipped(gates):
            raise
        raise ValueError(
            f"dyvte's default gates were trained for vtexit's default model and do not fit this one ({err}); train "
            "gates for this model with `vtexit train-gates` or vtexit.train_gates(...), then pass their folder as "
            "gates=..."
        ) from None
    return DyVTEPolicy(gates, threshold, gates.config.num_layers)


def is_shipped(gates: DyVTEGates) -> bool:
    """Whether ``gates`` are the ones shipped for the default model (``gates="default"``)."""
    try:
        return gates.source is not None and os.path.samefile(gates.source, GATES_DIR)
    except (OSError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class DyVTEConfig(MethodConfig):
    """Per-row exits decided by learned gates: ``gates`` is a folder (or ``"default"``), ``threshold`` in [0, 1]
    (None: the threshold saved with the gates)."""

    method: ClassVar[str] = "dyvte"
    handle_class: ClassVar[type] = DyVTEHandle
    gates: str = DEFAULT_GATES
    threshold: float | None = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        gates = os.fspath(self.gates) if isinstance(self.gates, os.PathLike) else self.gates
        if not isinstance(gates, str) or not gates:
            raise ValueError(f"gates must be 'default' or the path of a gates folder, got {shown(self.gates)}")
        object.__setattr__(self, "gates", gates)
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.threshold))

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        return build_dyvte_policy(model, load_gates(self.gates), self.threshold, family)
