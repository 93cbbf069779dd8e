"""Keeping ``torch.compile`` honest about vtexit's hooks.

Dynamo does not guard compiled graphs on module hooks (``skip_nnmodule_hook_guards``): a graph traced before
patching would keep running without the hooks, and one traced while patched would keep calling them after
``remove()``. Dropping only the code of this model's forwards is not enough (the resume functions after graph
breaks are cached apart), so patching and removing reset Dynamo's caches when it has compiled anything: every
compiled model traces again on its next call, with the hooks as they are then. Other compiled models recompute
exactly what they did; they only pay one recompilation.
"""

from __future__ import annotations

import torch


def forget_compiled_graphs() -> None:
    """Make every compiled wrapper trace again (a no-op when nothing was compiled)."""
    from torch._dynamo import convert_frame

    if convert_frame.input_codes.seen or convert_frame.output_codes.seen:
        torch._dynamo.reset()
