"""One entry point for every method: ``apply(model, config)``, and configs named by strings or dicts.

The CLI and evaluation plugins name a method and its settings as text (``"vtw"`` with ``layer=16``);
:func:`config_from_dict` turns that into the method's config dataclass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy
from vtexit.methods.base import MethodConfig


def method_configs() -> dict[str, type[MethodConfig]]:
    """Every built-in method by name."""
    from vtexit.methods.baseline import BaselineConfig
    from vtexit.methods.vtw.config import VTWConfig

    configs = {cls.method: cls for cls in (BaselineConfig, VTWConfig)}
    from vtexit.methods.fastv.config import FastVConfig
    from vtexit.methods.pdrop.config import PDropConfig
    from vtexit.methods.random_drop.config import RandomDropConfig

    configs.update({cls.method: cls for cls in (FastVConfig, PDropConfig, RandomDropConfig)})
    from vtexit.methods.dyvte.config import DyVTEConfig

    configs[DyVTEConfig.method] = DyVTEConfig
    from vtexit.methods.yopo.config import YOPOConfig

    configs[YOPOConfig.method] = YOPOConfig
    from vtexit.methods.divprune.config import DivPruneConfig

    configs[DivPruneConfig.method] = DivPruneConfig
    from vtexit.methods.hybrid.config import HybridConfig

    configs[HybridConfig.method] = HybridConfig
    from vtexit.methods.pool.config import PoolConfig

    configs[PoolConfig.method] = PoolConfig
    from vtexit.methods.dart.config import DARTConfig

    configs[DARTConfig.method] = DARTConfig
    from vtexit.methods.visionzip.config import VisionZipConfig

    configs[VisionZipConfig.method] = VisionZipConfig
    return configs


def nest_dotted(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"pre.method": "divprune", "pre.keep": "0.25"}`` -> ``{"pre": {"method": "divprune", "keep": "0.25"}}``: how
    flat ``key=value`` settings (lmms-eval's ``--model_args``) name the steps of a hybrid."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if not dot:
            if isinstance(nested.get(key), dict):
                raise ValueError(f"setting {key!r} is given both as a value and as {key}.<name> settings")
            nested[key] = value
            continue
        if not head or not rest:
            raise ValueError(f"setting {key!r} needs a name on each side of the dot (e.g. pre.keep)")
        group = nested.setdefault(head, {})
        if not isinstance(group, dict):
            raise ValueError(f"setting {key!r} conflicts with {head}={group!r}")
        group[rest] = value
    return {k: nest_dotted(v) if isinstance(v, dict) and any("." in x for x in v) else v for k, v in nested.items()}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """``{"method": "vtw", "layer": 16}`` (values may be strings) -> the method's config. Dotted keys nest
    (``"pre.keep"``: see :func:`nest_dotted`)."""
    data = nest_dotted(dict(data))
    name = data.pop("method", None)
    configs = method_configs()
    if name not in configs:
        raise ValueError(f"method must be one of {sorted(configs)}, got {name!r}")
    return configs[name].from_settings(data)


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
