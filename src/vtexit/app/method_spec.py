"""A method named on the command line, in either of two forms, wherever a command takes one (``evaluate --method``,
``sweep --config``, ``tune --config``):

- text: ``name`` or ``name:setting=value,setting=value``, e.g. ``vtw:layer=24`` or
  ``dyvte:gates=out/gates,threshold=0.7`` (a hybrid's steps as dotted settings: ``pre.method=divprune,pre.keep=0.5``);
- JSON: an object with a ``"method"`` key, e.g. ``{"method": "fastv", "layer": 2, "keep": 0.5}``.

Either may carry a ``label`` (the name of its row in a table). Values are converted by the method's config
(:func:`vtexit.config_from_dict`), so every registered method can be named the same way.
"""

from __future__ import annotations

import json
from typing import Any

from vtexit.methods.base import MethodConfig
from vtexit.methods.registry import config_from_dict

EXAMPLES = "name:key=value,key=value (e.g. fastv:layer=2,keep=0.5) or a JSON object with a 'method' key"
EXAMPLE_OBJECT = '{"method": "vtw", "layer": 16}'


def parse_method_point(text: str) -> dict[str, Any]:
    """``"fastv:layer=2,keep=0.5"`` or ``'{"method": "fastv", "layer": 2, "keep": 0.5}'`` -> the settings as a dict
    with its ``"method"`` (and ``"label"``, if given); ValueError naming what is wrong. Settings are checked by
    :func:`config_of_point`, not here."""
    stripped = text.strip()
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg}): {text!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"a method as JSON must be a JSON object like {EXAMPLE_OBJECT}, got {text!r}")
        return data
    name, _, rest = stripped.partition(":")
    settings: dict[str, Any] = {"method": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"a method must look like {EXAMPLES}; got {part!r} in {text!r}")
        settings[key.strip()] = value.strip()
    return settings


def config_of_point(point: dict[str, Any]) -> MethodConfig:
    """A point's config (its ``label`` left out). A config refusing its settings raises ValueError or, from a
    dataclass constructor, TypeError: callers that face users catch both."""
    return config_from_dict({key: value for key, value in point.items() if key != "label"})


def parse_method_spec(text: str) -> MethodConfig:
    """``"dyvte:gates=out/gates,threshold=0.7"`` or its JSON object -> the method's config; ValueError (or TypeError
    from a config's constructor) naming what is wrong."""
    return config_of_point(parse_method_point(text))
