"""Method configs: dataclasses that name a method and its settings, round-trip through a dict / JSON, and build
the method's policy for a model. ``vtexit.apply(model, config)`` patches any of them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; subclasses set ``method`` and define :meth:`build_policy`."""

    method: ClassVar[str] = ""
    handle_class: ClassVar[type[PatchHandle]] = PatchHandle

    def build_policy(self, model: nn.Module, family: FamilySpec) -> Policy:
        """Validate the settings against ``model`` (ValueError naming the setting) and make the policy."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> MethodConfig:
        """Build from a dict of settings; strings (from a CLI or ``--model_args``) are converted to field types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise ValueError(f"unknown settings {unknown} for method {cls.method!r}; allowed: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _convert(name, value, hints[name]) for name, value in settings.items()})


def _convert(name: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str) or hint is str:
        return value
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if str in options:  # the setting takes text itself (e.g. a file path); the config checks it
        return value
    for option in options:
        if option is bool and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if option in (int, float):
            try:
                return option(value)
            except ValueError:
                continue
    if value.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    raise ValueError(f"setting {name}={value!r} is not a valid {hint}")
