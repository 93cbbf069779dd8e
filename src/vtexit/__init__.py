"""vtexit: take visual tokens out of the deep decoder layers of multimodal LLMs.

``vtexit.apply(model, config)`` patches a model with any method; ``withdraw`` (VTW) is its short form.
"""

from vtexit.core.costs import CallCost, LayerCost, RunCost
from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, register_family, supported_model_types
from vtexit.core.handle import PatchHandle, patch_of
from vtexit.core.layout import Layout
from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.base import MethodConfig
from vtexit.methods.baseline import BaselineConfig, baseline
from vtexit.methods.dart import DARTConfig, dart
from vtexit.methods.divprune import DivPruneConfig, divprune
from vtexit.methods.dyvte import DyVTEConfig, DyVTEGates, DyVTEHandle, dyvte, train_gates
from vtexit.methods.fastv import FastVConfig, fastv
from vtexit.methods.hybrid import HybridConfig, hybrid
from vtexit.methods.pdrop import PDropConfig, pdrop
from vtexit.methods.pool import PoolConfig, pool
from vtexit.methods.random_drop import RandomDropConfig, random_drop
from vtexit.methods.registry import apply, apply_policy, config_from_dict, method_configs
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
    "method_configs",
    "patch_of",
    "register_family",
    "supported_model_types",
    "valid_layer_range",
    "withdraw",
]
