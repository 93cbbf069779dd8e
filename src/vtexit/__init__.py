"""vtexit: take visual tokens out of the deep decoder layers of multimodal LLMs.

``vtexit.apply(model, config)`` patches a model with any method (a config or its dict); ``withdraw`` (VTW) is its
short form. ``vtexit.load_default()`` is the built-in default model and its processor.

The exports are imported on first use (PEP 562 ``__getattr__``), all at once and in the order below, so that
``import vtexit.app.cli`` (the ``vtexit`` command) starts without torch and transformers: ``vtexit --help`` stays
fast. After the first access the package is as it was when these imports ran eagerly.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtexit.core.costs import CallCost, LayerCost, RunCost
    from vtexit.core.engine import ScheduleEngine
    from vtexit.core.families import FamilySpec, register_family, supported_model_types
    from vtexit.core.handle import PatchHandle, patch_of
    from vtexit.core.layout import Layout
    from vtexit.core.policy import Policy, PrefillView
    from vtexit.default_model import load_default
    from vtexit.methods.base import MethodConfig
    from vtexit.methods.baseline import BaselineConfig, baseline
    from vtexit.methods.dart import DARTConfig, dart
    from vtexit.methods.divprune import DivPruneConfig, divprune
    from vtexit.methods.dyvte import DyVTEConfig, DyVTEGates, DyVTEHandle, dyvte, train_gates
    from vtexit.methods.fastv import FastVConfig, fastv
    from vtexit.methods.hybrid import HybridConfig, hybrid
    from vtexit.methods.patch import apply_policy
    from vtexit.methods.pdrop import PDropConfig, pdrop
    from vtexit.methods.pool import PoolConfig, pool
    from vtexit.methods.random_drop import RandomDropConfig, random_drop
    from vtexit.methods.registry import apply, config_from_dict, method_configs
    from vtexit.methods.visionzip import VisionZipConfig, visionzip
    from vtexit.methods.vtw import (
        CalibrationResult,
        VTWConfig,
        WithdrawHandle,
        calibrate,
        valid_layer_range,
        withdraw,
    )
    from vtexit.methods.yopo import HeadMask, YOPOConfig, calibrate_heads, yopo

# Where each export lives, in the order the imports run (the order the eager imports ran, so side effects such as
# registrations happen as before). The TYPE_CHECKING block above says the same for type checkers and IDEs;
# tests/test_api.py checks that the two and __all__ agree.
_HOMES = {
    "vtexit.core.costs": ("CallCost", "LayerCost", "RunCost"),
    "vtexit.core.engine": ("ScheduleEngine",),
    "vtexit.core.families": ("FamilySpec", "register_family", "supported_model_types"),
    "vtexit.core.handle": ("PatchHandle", "patch_of"),
    "vtexit.core.layout": ("Layout",),
    "vtexit.core.policy": ("Policy", "PrefillView"),
    "vtexit.methods.base": ("MethodConfig",),
    "vtexit.methods.baseline": ("BaselineConfig", "baseline"),
    "vtexit.methods.dart": ("DARTConfig", "dart"),
    "vtexit.methods.divprune": ("DivPruneConfig", "divprune"),
    "vtexit.methods.dyvte": ("DyVTEConfig", "DyVTEGates", "DyVTEHandle", "dyvte", "train_gates"),
    "vtexit.methods.fastv": ("FastVConfig", "fastv"),
    "vtexit.methods.hybrid": ("HybridConfig", "hybrid"),
    "vtexit.methods.patch": ("apply_policy",),
    "vtexit.methods.pdrop": ("PDropConfig", "pdrop"),
    "vtexit.methods.pool": ("PoolConfig", "pool"),
    "vtexit.methods.random_drop": ("RandomDropConfig", "random_drop"),
    "vtexit.methods.registry": ("apply", "config_from_dict", "method_configs"),
    "vtexit.methods.visionzip": ("VisionZipConfig", "visionzip"),
    "vtexit.methods.vtw": (
        "CalibrationResult",
        "VTWConfig",
        "WithdrawHandle",
        "calibrate",
        "valid_layer_range",
        "withdraw",
    ),
    "vtexit.methods.yopo": ("HeadMask", "YOPOConfig", "calibrate_heads", "yopo"),
    "vtexit.default_model": ("load_default",),  # last: it imports the methods (its shipped DyVTE gates)
}

__all__ = [
    "HeadMask",
    "YOPOConfig",
    "calibrate_heads",
    "yopo",
    "DARTConfig",
    "dart",
    "DivPruneConfig",
    "divprune",
    "HybridConfig",
    "hybrid",
    "PoolConfig",
    "pool",
    "VisionZipConfig",
    "visionzip",
    "DyVTEConfig",
    "DyVTEGates",
    "DyVTEHandle",
    "dyvte",
    "train_gates",
    "FastVConfig",
    "PDropConfig",
    "RandomDropConfig",
    "fastv",
    "pdrop",
    "random_drop",
    "BaselineConfig",
    "CalibrationResult",
    "CallCost",
    "FamilySpec",
    "LayerCost",
    "Layout",
    "MethodConfig",
    "PatchHandle",
    "Policy",
    "PrefillView",
    "RunCost",
    "ScheduleEngine",
    "VTWConfig",
    "WithdrawHandle",
    "apply",
    "apply_policy",
    "baseline",
    "calibrate",
    "config_from_dict",
    "load_default",
    "method_configs",
    "patch_of",
    "register_family",
    "supported_model_types",
    "valid_layer_range",
    "withdraw",
]

# Set as attributes of the package by the imports of _HOMES (``vtexit.core.families`` and the like worked after a
# plain ``import vtexit`` when the imports were eager).
_SUBPACKAGES = ("core", "methods")


def __getattr__(name: str):
    """First access to an export (or to ``vtexit.core`` / ``vtexit.methods``): import every export, as before."""
    if name not in __all__ and name not in _SUBPACKAGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    for module, names in _HOMES.items():
        home = importlib.import_module(module)
        globals().update({each: getattr(home, each) for each in names})
    return globals()[name]


def __dir__() -> list[str]:
    """What ``dir(vtexit)`` listed when the imports were eager: dunders, exports and submodules, no helpers."""
    shown = {name for name in globals() if not name.startswith("_") or name.startswith("__")}
    return sorted((shown | set(__all__) | set(_SUBPACKAGES)) - {"TYPE_CHECKING", "__getattr__", "__dir__"})
