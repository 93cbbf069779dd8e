"""Wall time of a module's calls, with forward hooks, so one stage (e.g. the LM prefill) can be timed inside a
whole ``generate`` or forward without running it separately."""

from __future__ import annotations

import time

from torch import nn


class CallTimer:
    """Records the wall time of every call of ``module`` while the ``with`` block is open."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.durations: list[float] = []
        self._start = 0.0
        self._hooks: list = []

    def _begin(self, *_) -> None:
        self._start = time.perf_counter()

    def _end(self, *_) -> None:
        self.durations.append(time.perf_counter() - self._start)

    def __enter__(self) -> CallTimer:
        self._hooks = [self.module.register_forward_pre_hook(self._begin), self.module.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
