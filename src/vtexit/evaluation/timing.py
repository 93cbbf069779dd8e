"""Wall time of a module's calls, with forward hooks, so one stage (e.g. the LM prefill) can be timed inside a
whole ``generate`` or forward without running it separately.

On a GPU, kernels run asynchronously: each timed call is bracketed by a device synchronisation, so the time is the
device's. That adds syncs, which is why this is for benchmarks and evaluation, never for the patched forward itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def _synchronize(module: nn.Module) -> Callable[[], None]:
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        device = parameter.device
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class CallTimer:
    """Records the wall time of every call of ``module`` while the ``with`` block is open."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.durations: list[float] = []
        self._start = 0.0
        self._hooks: list = []
        self._sync = _synchronize(module)

    def _begin(self, *_) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self, *_) -> None:
        self._sync()
        self.durations.append(time.perf_counter() - self._start)

    def __enter__(self) -> CallTimer:
        self._hooks = [self.module.register_forward_pre_hook(self._begin), self.module.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
