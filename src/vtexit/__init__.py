"""vtexit: take visual tokens out of the deep decoder layers of multimodal LLMs."""

from .engine import Policy, PrefillView, ScheduleEngine
from .families import FamilySpec, register_family, supported_model_types
from .handle import PatchHandle
from .methods.vtw import WithdrawHandle, valid_layer_range, withdraw
from .schedule import Layout

__all__ = [
    "FamilySpec",
    "Layout",
    "PatchHandle",
    "Policy",
    "PrefillView",
    "ScheduleEngine",
    "WithdrawHandle",
    "register_family",
    "supported_model_types",
    "valid_layer_range",
    "withdraw",
]
