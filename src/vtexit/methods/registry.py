"""Every built-in method by name, configs named by strings or dicts, and ``vtexit.apply``, which takes either.

The CLI and evaluation plugins name a method and its settings as text (``"vtw"`` with ``layer=16``);
:func:`config_from_dict` turns that into the method's config dataclass. :func:`apply` (the top-level
``vtexit.apply``) takes a config or its dict and patches with :func:`vtexit.methods.patch.apply`, which takes configs
only: the method packages import ``patch``, and this module imports every method, so ``patch`` cannot convert dicts
itself without an import circle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.methods import patch
from vtexit.methods.base import MethodConfig, config_of
from vtexit.methods.baseline.config import BaselineConfig
from vtexit.methods.dart.config import DARTConfig
from vtexit.methods.divprune.config import DivPruneConfig
from vtexit.methods.dyvte.config import DyVTEConfig
from vtexit.methods.fastv.config import FastVConfig
from vtexit.methods.hybrid.config import HybridConfig
from vtexit.methods.pdrop.config import PDropConfig
from vtexit.methods.pool.config import PoolConfig
from vtexit.methods.random_drop.config import RandomDropConfig
from vtexit.methods.visionzip.config import VisionZipConfig
from vtexit.methods.vtw.config import VTWConfig
from vtexit.methods.yopo.config import YOPOConfig


def method_configs() -> dict[str, type[MethodConfig]]:
    """Every built-in method by name."""
    configs = (
        BaselineConfig,
        VTWConfig,
        FastVConfig,
        PDropConfig,
        RandomDropConfig,
        DyVTEConfig,
        YOPOConfig,
        DivPruneConfig,
        HybridConfig,
        PoolConfig,
        DARTConfig,
        VisionZipConfig,
    )
    return {cls.method: cls for cls in configs}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """``{"method": "vtw", "layer": 16}`` (values may be strings) -> the method's config. Dotted keys nest
    (``"pre.keep"``: see :func:`nest_dotted`)."""
    return config_of(method_configs(), data)


def apply(
    model: nn.Module, config: MethodConfig | Mapping[str, Any], *, family: FamilySpec | None = None
) -> PatchHandle:
    """Patch ``model`` with a method config, or its dict (``{"method": "vtw", "layer": 24}``, read by
    :func:`config_from_dict`; values may be strings); returns the handle (``remove()`` restores the model).

    The settings are checked against the model before anything is attached, so a refused config leaves the
    model untouched (a ValueError naming the setting).
    """
    if isinstance(config, Mapping):
        config = config_from_dict(config)
    elif not isinstance(config, MethodConfig):
        raise ValueError(
            "config must be a vtexit method config or its dict (e.g. VTWConfig(layer=24) or "
            f"{{'method': 'vtw', 'layer': 24}}), got {type(config).__name__}"
        )
    return patch.apply(model, config, family=family)
