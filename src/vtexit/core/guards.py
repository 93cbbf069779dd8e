"""Guards around a patch: what counts as media input, what a compiled wrapper or a pickled or copied patch needs,
and caches that must not outlive their patch."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

from vtexit.core.transformers_compat import MEDIA_INPUT_NAMES, Cache


def has_media_inputs(kwargs: dict) -> bool:
    """Media inputs that carry something: ``None``, empty tensors and empty mappings are no media."""
    for name in MEDIA_INPUT_NAMES:
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() > 0:
                return True
        elif isinstance(value, Mapping):
            if any(v is not None for v in value.values()):
                return True
        elif value:
            return True
    return False


def refuse_compiled(model: nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            "got the wrapper returned by torch.compile(model): patch the original module (compiled._orig_mod); "
            "the compiled wrapper then runs the patched model (it traces again on its next call)"
        )


def poison(cache: Cache) -> None:
    """A cache compacted under a patch is only valid under that patch: make it refuse to be continued."""

    def refuse(*args, **kwargs):
        raise ValueError(
            "this cache was filled while vtexit withdrew tokens, and the patch has been removed: its withdrawn "
            "layers hold fewer positions, so the unpatched model cannot continue it. Start generation again."
        )

    cache.get_seq_length = refuse
    cache.update = refuse
    forget_on_reset(cache, "get_seq_length", "update")  # an emptied cache is valid for any model again


def forget_on_reset(cache: Cache, *names: str, restore: Callable[[Cache], None] | None = None) -> None:
    """Make ``cache.reset()`` also remove the instance attributes ``names`` that vtexit set on the cache, and call
    ``restore(cache)`` before the cache's own reset (a reset static cache may be passed to a model again). Calls
    accumulate until the next reset."""
    current = cache.__dict__.get("reset")
    old_names, old_restores = (), ()
    if isinstance(current, partial) and current.func is _reset_forgetting:
        old_names, old_restores = current.args[1], current.args[2]
    restores = old_restores if restore is None or restore in old_restores else (*old_restores, restore)
    cache.reset = partial(_reset_forgetting, weakref.ref(cache), tuple(dict.fromkeys((*old_names, *names))), restores)


def _reset_forgetting(cache_ref, names: tuple[str, ...], restores: tuple) -> None:
    cache = cache_ref()
    for name in (*names, "reset"):
        cache.__dict__.pop(name, None)
    for restore in restores:  # after the wrapper is gone, so that a restore may set it again
        restore(cache)
    type(cache).reset(cache)


def copy_removable_handle(handle, memo: dict):
    """Copy a hook handle so that it removes the hook from the *copied* module's hook dicts."""
    new = copy.copy(handle)
    new.hooks_dict_ref = weakref.ref(copy.deepcopy(handle.hooks_dict_ref(), memo))
    new.extra_dict_ref = tuple(weakref.ref(copy.deepcopy(ref(), memo)) for ref in handle.extra_dict_ref)
    return new
