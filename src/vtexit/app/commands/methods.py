"""``vtexit methods``: every method by name, its settings (type and default) and the model families it runs on.

The settings come from the config dataclasses (:func:`vtexit.method_configs`), the families from the support matrix
(:mod:`vtexit.methods.support`), so the listing is what ``--method``, ``--config`` and :func:`vtexit.apply` accept.
"""

from __future__ import annotations

import dataclasses

from rich.markup import escape

from vtexit.app.common import METHOD_FORMS, console


def _setting(field: dataclasses.Field) -> str:
    """``layer: int (required)`` or ``keep: float = 0.5``."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return f"{field.name}: {kind} (required)"
    if isinstance(value, tuple):
        value = "/".join(str(v) for v in value)  # as name:key=value takes it (layers=8/16/24)
    return f"{field.name}: {kind} = {value}"


def methods() -> None:
    """Every method with its settings (types, defaults) and the model families it runs on."""
    from vtexit.methods.registry import method_configs
    from vtexit.methods.support import ALL_FAMILIES, families_of, family_list

    console.print(
        f"Name a method as {escape(METHOD_FORMS)}, e.g. --method fastv:layer=2,keep=0.5\n"
        f"Model families ({len(ALL_FAMILIES)}): {escape(family_list(ALL_FAMILIES, named=True))}\n",
        highlight=False,
    )
    for name, config in method_configs().items():
        summary = " ".join((config.__doc__ or "").split("\n\n")[0].split()).replace("``", "`").split(". ")[0]
        lines = [f"[bold]{name}[/]  {escape(config.__name__)}" + (f": {escape(summary)}" if summary else "")]
        settings = [_setting(f) for f in dataclasses.fields(config)]
        lines.append("  settings: " + (escape("; ".join(settings)) if settings else "none (the unpatched model)"))
        rows = families_of(name)
        for row in rows:  # a row about one setting (YOPO's window, PyramidDrop's renumber) is named by it
            label = escape(row.what) if len(rows) > 1 and len(row.methods) == 1 else "families"
            text = f"  {label}: {family_list(row.families)}"
            if row.refused:
                text += f"; refused on {family_list(row.refused)}: {escape(row.why)}"
            lines.append(text)
        console.print("\n".join(lines) + "\n", highlight=False)
