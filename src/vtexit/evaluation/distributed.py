"""Data-parallel evaluation: processes started by ``torchrun`` or ``accelerate launch`` split the batches.

Inside ``with data_parallel():`` every call of :func:`~vtexit.evaluation.evaluate.evaluate_interleaved` (so also
``vtexit evaluate`` and the sweep) runs only every ``world_size``-th batch of the single-process batching, starting at
its rank, and then gathers the other processes' batches: every process returns the same merged result, with answers
in record order. The batches are the single-process ones (whole batches are dealt out, never re-cut), so the answers
and FLOPs are exactly those of one process; times are medians over all processes' batches.

The ranks come from the environment that torchrun and accelerate set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Results are gathered as Python objects over a gloo group (CPU), whatever
backend the default process group uses. Every process must make the same evaluation calls, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["Ranks", "active", "data_parallel", "gather_union", "is_main_process", "ranks_from_env"]


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class _Active:
    ranks: Ranks
    group: Any  # the gloo group results are gathered over (None: the default group is gloo)


_ACTIVE: ContextVar[_Active | None] = ContextVar("vtexit_data_parallel", default=None)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def ranks_from_env() -> Ranks:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun and accelerate launch set them (one process if unset)."""
    ranks = Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE) and WORLD_SIZE >= 1, got {ranks}")
    return ranks


@contextmanager
def data_parallel(backend: str = "gloo") -> Iterator[Ranks]:
    """Split evaluations across the launched processes while the block runs; yields this process's ranks.

    With ``WORLD_SIZE`` > 1 it initialises torch.distributed's default process group with ``backend`` if nobody has
    (and destroys it afterwards); with one process it changes nothing.
    """
    ranks = ranks_from_env()
    if ranks.world_size == 1:
        yield ranks
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != ranks.world_size or dist.get_rank() != ranks.rank:
        raise ValueError(
            f"the process group ({dist.get_rank()} of {dist.get_world_size()}) does not match RANK/WORLD_SIZE {ranks}"
        )
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    token = _ACTIVE.set(_Active(ranks, group))
    try:
        yield ranks
    finally:
        _ACTIVE.reset(token)
        if created:
            dist.destroy_process_group()


def active() -> Ranks | None:
    """This process's ranks inside :func:`data_parallel` with several processes, else None."""
    state = _ACTIVE.get()
    return None if state is None else state.ranks


def is_main_process() -> bool:
    """False only on the ranks > 0 of an active :func:`data_parallel` (they leave writing files to rank 0)."""
    ranks = active()
    return ranks is None or ranks.rank == 0


def gather_union(part: dict) -> dict:
    """The union of every process's ``part`` (their keys must not overlap), the same on every process."""
    state = _ACTIVE.get()
    if state is None:
        return dict(part)
    parts: list[dict | None] = [None] * state.ranks.world_size
    dist.all_gather_object(parts, part, group=state.group)
    merged: dict = {}
    for other in parts:
        overlap = merged.keys() & other.keys()  # type: ignore[union-attr]
        if overlap:
            raise ValueError(f"processes returned the same keys {sorted(overlap)}: their work overlapped")
        merged.update(other)  # type: ignore[arg-type]
    return merged
