"""vtexit: take visual tokens out of the deep decoder layers of multimodal LLMs."""

from vtexit.core.engine import Policy, PrefillView, ScheduleEngine
from vtexit.core.families import FamilySpec, register_family, supported_model_types
from vtexit.core.handle import PatchHandle
from vtexit.core.layout import Layout
from vtexit.methods.vtw.policy import WithdrawHandle, valid_layer_range, withdraw

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
