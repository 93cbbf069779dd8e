"""Every built-in method by name, and configs named by strings or dicts (``apply`` is in :mod:`vtexit.methods.patch`).

The CLI and evaluation plugins name a method and its settings as text (``"vtw"`` with ``layer=16``);
:func:`config_from_dict` turns that into the method's config dataclass.
"""

from __future__ import annotations

from typing import Any

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
