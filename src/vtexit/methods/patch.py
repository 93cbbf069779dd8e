"""Patching a model: ``apply(model, config)`` for any method config, ``apply_policy`` for a hand-written policy.

Every method package's short verb (``withdraw``, ``fastv``, ...) calls :func:`apply`; the names of all methods
live in :mod:`vtexit.methods.registry`, above the methods.
"""

from __future__ import annotations

from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig


def apply(model: nn.Module, config: MethodConfig, *, family: FamilySpec | None = None) -> PatchHandle:
    """Patch ``model`` with the method ``config`` describes; returns its handle (``remove()`` restores the model).

    The settings are checked against the model before anything is attached, so a refused config leaves the
    model untouched.
    """
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config must be a vtexit method config (e.g. VTWConfig), got {type(config).__name__}")
    family = family or family_for(model)
    policy = config.build_policy(model, family)
    engine = ScheduleEngine(model, policy, family)
    engine.attach()
    return config.handle_class(engine, config)


def apply_policy(model: nn.Module, policy: Policy, *, family: FamilySpec | None = None) -> PatchHandle:
    """Patch ``model`` with a hand-written :class:`~vtexit.core.policy.Policy` (a method of your own)."""
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a vtexit.Policy, got {type(policy).__name__}")
    engine = ScheduleEngine(model, policy, family)
    engine.attach()
    return PatchHandle(engine)
