"""Keeping ``torch.compile`` honest about vtexit's hooks.

Dynamo does not guard compiled graphs on module hooks (``skip_nnmodule_hook_guards``): a graph traced before
patching would keep running without the hooks, and one traced while patched would keep calling them after
``remove()``. Dropping only the code of this model's forwards is not enough (the resume functions after graph
breaks are cached apart), so patching and removing reset Dynamo's caches when it has compiled anything: every
compiled model traces again on its next call, with the hooks as they are then. Other compiled models recompute
exactly what they did; they only pay one recompilation.
"""

from __future__ import annotations

import functools

import torch


def forget_compiled_graphs() -> None:
    """Make every compiled wrapper trace again (a no-op when nothing was compiled)."""
    from torch._dynamo import convert_frame

    if convert_frame.input_codes.seen or convert_frame.output_codes.seen:
        torch._dynamo.reset()


def eager_under_compile(function):
    """Run ``function`` eagerly under ``torch.compile``: vtexit's hooks and replaced forwards keep per-call Python
    state, which a compiled graph must not bake in. Dynamo breaks the graph around them; the rest still compiles.
    Outside compilation the function is called directly (the disabled wrapper costs a few microseconds per call).
    Works on plain functions and on methods (decorate them in the class body)."""
    disabled = torch.compiler.disable(function, recursive=True)

    @functools.wraps(function)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    return run
