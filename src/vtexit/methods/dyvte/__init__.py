"""DyVTE, dynamic visual-token exit: small learned gates decide, per row and while its prefill runs, the layer
before which all of its visual tokens leave. Config, gates, policy, labels from the model itself, training."""

from __future__ import annotations

import os

from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.methods.dyvte.config import (
    DEFAULT_THRESHOLD,
    DyVTEConfig,
    build_dyvte_policy,
    check_threshold,
    load_gates,
)
from vtexit.methods.dyvte.gates import DyVTEGates, GatesConfig
from vtexit.methods.dyvte.policy import DyVTEHandle, DyVTEPolicy
from vtexit.methods.dyvte.train import GateTraining, train_gates


def dyvte(
    model: nn.Module,
    gates: DyVTEGates | str | os.PathLike[str] = "default",
    *,
    threshold: float | None = DEFAULT_THRESHOLD,
    family: FamilySpec | None = None,
) -> DyVTEHandle:
    """Patch ``model`` with DyVTE: each row withdraws its visual tokens before the first gated layer whose gate
    says exit, P(exit) > ``threshold`` (None: the threshold saved with the gates).

    ``gates``: a :class:`DyVTEGates`, a folder written by its ``save_pretrained``, or ``"default"`` (the gates
    shipped for the default model). ``handle.exit_layers`` gives the layer of each row of the last prefill.
    Same as ``vtexit.apply(model, DyVTEConfig(folder, threshold))``."""
    if threshold is not None:
        threshold = check_threshold(threshold)
    if isinstance(gates, DyVTEGates):
        config = DyVTEConfig(gates=gates.source or "(in memory)", threshold=threshold)
    elif isinstance(gates, (str, os.PathLike)):
        config = DyVTEConfig(gates=os.fspath(gates), threshold=threshold)
        gates = load_gates(config.gates)
    else:
        raise ValueError(f"gates must be DyVTEGates, a gates folder or 'default', got {type(gates).__name__}")
    family = family or family_for(model)
    engine = ScheduleEngine(model, build_dyvte_policy(model, gates, threshold, family), family)
    engine.attach()
    return DyVTEHandle(engine, config)


__all__ = [
    "DEFAULT_THRESHOLD",
    "DyVTEConfig",
    "DyVTEGates",
    "DyVTEHandle",
    "DyVTEPolicy",
    "GateTraining",
    "GatesConfig",
    "dyvte",
    "train_gates",
]
