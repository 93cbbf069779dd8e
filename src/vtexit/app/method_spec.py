"""A method named on the command line: ``name`` or ``name:setting=value,setting=value``.

For example ``dyvte:gates=out/gates,threshold=0.7`` or ``vtw:layer=24``; values are converted by the method's
config (:func:`vtexit.config_from_dict`), so every registered method can be named the same way.
"""

from __future__ import annotations

from vtexit.methods.base import MethodConfig
from vtexit.methods.registry import config_from_dict


def parse_method_spec(text: str) -> MethodConfig:
    """``"dyvte:gates=out/gates,threshold=0.7"`` -> the method's config; ValueError naming what is wrong."""
    name, _, rest = text.partition(":")
    settings: dict[str, str] = {"method": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"method settings must look like name:key=value,key=value; got {part!r} in {text!r}")
        settings[key.strip()] = value.strip()
    return config_from_dict(settings)
