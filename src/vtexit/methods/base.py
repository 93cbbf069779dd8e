"""Method configs: dataclasses that name a method and its settings, round-trip through a dict / JSON, and build
the method's policy for a model. ``vtexit.apply(model, config)`` patches any of them."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.handle import PatchHandle
from vtexit.core.policy import Policy
from vtexit.core.transformers_compat import uses_multimodal_rope


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
        if not isinstance(settings, Mapping):
            raise ValueError(f"settings of method {cls.method!r} must be a dict of name: value, got {shown(settings)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        names = [name for name in settings if not isinstance(name, str)]
        if names:
            raise ValueError(f"setting names must be strings, got {shown(names[0])} for method {cls.method!r}")
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise ValueError(f"unknown settings {unknown} for method {cls.method!r}; allowed: {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in settings
        ]
        if required:
            missing = ", ".join(repr(name) for name in required)
            plural = "s" if len(required) > 1 else ""
            raise ValueError(f"missing required setting{plural} {missing} for method {cls.method!r}")
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
    raise ValueError(f"setting {name}={shown(value)} is not a valid {hint}")


# ------------------------------------------------------------------------------------------- checks of settings
# Every config checks its settings with these, in ``__post_init__`` (what the model does not decide) and in
# ``build_policy`` (what it does): numbers as numbers (``numbers.Integral`` for an int, incl. numpy's, stored as a
# plain int; ``numbers.Real`` for a float, stored as a float; bool refused where a number is expected; finite, in
# range), text from a list of choices, and a ValueError that names the setting and what it takes.


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters (a setting may be a huge int or a long list)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (sys.set_int_max_str_digits)
        return f"an int of {int(value).bit_length()} bits"
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def is_bool(value: object) -> bool:
    """True for ``True`` / ``False`` and numpy's bools (refused where a number is expected)."""
    return isinstance(value, (bool, np.bool_))


def _why(what: str) -> str:
    return f" ({what})" if what else ""


def _int_range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_int(
    name: str,
    value: object,
    *,
    low: int | None = None,
    high: int | None = None,
    what: str = "",
    bounds: str | None = None,
    optional: bool = False,
) -> Any:
    """``value`` as a plain int, or a ValueError naming the setting ``name``: any ``numbers.Integral`` (numpy's too;
    not a bool) in [``low``, ``high``]. ``bounds``: the range as the message says it (default from low / high);
    ``optional``: None is allowed (and returned)."""
    if value is None and optional:
        return None
    text = bounds or _int_range(low, high)
    expected = f"{'None or ' if optional else ''}an int{' ' + text if text else ''}{_why(what)}"
    if is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {expected}, got {shown(number)}")
    return number


def _float_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}" if high is not None else ""


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
    optional: bool = False,
) -> Any:
    """``value`` as a float, or a ValueError naming the setting ``name``: a finite ``numbers.Real`` (ints of any size
    included, numpy's too; not a bool) between ``low`` and ``high`` (``*_open``: the bound itself excluded).
    ``optional``: None is allowed (and returned)."""
    if value is None and optional:
        return None
    text = _float_range(low, high, low_open, high_open)
    if low is not None and high is not None:  # "keep must be a number in (0, 1]", "keep must be in (0, 1]"
        as_type, as_range = f"a number {text}", text
    else:  # "ffn_ratio must be a finite number >= 1"
        as_type = as_range = f"a finite number {text}".rstrip()
    none = "None or " if optional else ""
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {none}{as_type}{_why(what)}, got {shown(value)}")
    try:  # a huge int or Fraction has no float: out of range, not an OverflowError
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    in_range = (
        math.isfinite(number)
        and (low is None or (number > low if low_open else number >= low))
        and (high is None or (number < high if high_open else number <= high))
    )
    if not in_range:
        raise ValueError(f"{name} must be {as_range}{_why(what)}, got {shown(value)}")
    return number


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool (numpy's too), or a ValueError naming the setting ``name``."""
    if not is_bool(value):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")
    return bool(value)


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """``value`` if it is one of the strings ``choices``, else a ValueError naming the setting ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {shown(value)}")
    return value


# What runs on every family (no renumbered positions): the alternatives the refusals below point to.
RUNS_ON_EVERY_FAMILY = "vtw, fastv, dart, random_drop or pdrop with renumber=False (they keep original positions)"


def renumbering_refusal(model: nn.Module, family: FamilySpec, before_llm: bool) -> str | None:
    """Why ``model`` cannot run a policy that renumbers positions, in the user's words; None when it can. The same
    rules as the engine's own check, asked first so that the refusal names the method and what to use instead.

    ``before_llm``: a reduction before the language model (decoder layer 0), which runs on every family with a
    rotary embedding: 1D positions are renumbered as in the shorter prompt (per attention type where the rotary
    embedding has one, Gemma3), multimodal RoPE keeps each kept token's original (t, h, w) position."""
    if uses_multimodal_rope(model.config.get_text_config()):
        return (
            None
            if before_llm
            else "it renumbers positions, which multimodal RoPE (3D positions of the image grid) has no form for"
        )
    if getattr(family.resolve(model).language_model, "rotary_emb", None) is None:
        return "it renumbers positions, and this language model has no rotary embedding vtexit can renumber"
    return None


def check_renumbering(method: str, model: nn.Module, family: FamilySpec, *, before_llm: bool) -> None:
    """ValueError naming ``method``, the family and what to use instead, unless ``model`` can run a policy that
    renumbers positions (see :func:`renumbering_refusal`)."""
    why = renumbering_refusal(model, family, before_llm)
    if why is not None:
        raise ValueError(f"{method} is not supported for {family.name} yet: {why}; use {RUNS_ON_EVERY_FAMILY} instead")


def nest_dotted(settings: Mapping[str, Any], inside: str = "") -> dict[str, Any]:
    """``{"pre.method": "divprune", "pre.keep": "0.25"}`` -> ``{"pre": {"method": "divprune", "keep": "0.25"}}``: how
    flat ``key=value`` settings (lmms-eval's ``--model_args``) name the steps of a hybrid.

    Returns new dicts all the way down (the caller's are never changed). A name given both as a value and as
    ``name.<setting>`` keys (e.g. ``pre={...}`` and ``pre.keep``) is refused, whatever the order. ``inside``: the
    setting that holds ``settings``, for the messages."""
    for key in settings:
        if not isinstance(key, str):
            where = f" (in {inside})" if inside else ""
            raise ValueError(f"setting names must be strings, got {shown(key)}{where}")
    path = f"{inside}." if inside else ""  # the messages name a nested setting by its whole dotted path
    dotted: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if dot and (not head or not rest):
            raise ValueError(f"setting {path + key!r} needs a name on each side of the dot (e.g. pre.keep)")
        if dot:
            if head in settings:
                raise ValueError(
                    f"setting {path + key!r} clashes with {path + head}={shown(settings[head])}: {path + head!r} is "
                    f"given both as a value and as {path + head}.<name> settings"
                )
            dotted.setdefault(head, {})[rest] = value
    nested = {key: value for key, value in settings.items() if "." not in key}
    nested.update(dotted)
    return {
        key: nest_dotted(value, f"{inside}.{key}" if inside else key) if isinstance(value, Mapping) else value
        for key, value in nested.items()
    }


def config_of(configs: dict[str, type[MethodConfig]], data: Mapping[str, Any]) -> MethodConfig:
    """``{"method": name, **settings}`` (values may be strings; dotted keys nest, see :func:`nest_dotted`) -> the
    config of the method ``name`` among ``configs``. ``data`` is left as it is."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a method config must be a dict such as {{'method': 'vtw', 'layer': 16}}, got {shown(data)}")
    data = nest_dotted(data)
    name = data.pop("method", None)
    if not isinstance(name, str) or name not in configs:
        raise ValueError(f"method must be one of {sorted(configs)}, got {shown(name)}")
    return configs[name].from_settings(data)
