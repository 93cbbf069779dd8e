"""Several boolean checks read to the host in one sync that ``torch.profiler`` counts.

``Tensor.tolist()`` syncs a CUDA device too, but records no ``aten::_local_scalar_dense``, so sync counts taken with
the profiler (on CPU as on CUDA) would miss it. Packing up to eight 0-dim bool checks into the bytes of one int64
and reading it with ``int()`` costs the same kernels as ``tolist`` and stays visible.
"""

from __future__ import annotations

import sys

import torch

MAX_CHECKS = 8


def read_checks(checks: list[torch.Tensor]) -> list[bool]:
    """``[bool(c) for c in checks]`` with one host read (0-dim bool tensors on one device, at most eight)."""
    if not 0 < len(checks) <= MAX_CHECKS:
        raise ValueError(f"read_checks takes 1 to {MAX_CHECKS} checks, got {len(checks)}")
    if len(checks) == 1:
        return [bool(checks[0].item())]
    padded = checks + [checks[0]] * (MAX_CHECKS - len(checks))  # the extra bytes are never read
    code = int(torch.stack(padded).view(torch.uint8).view(torch.int64))
    little = sys.byteorder == "little"  # byte i of the stacked checks is check i
    return [bool((code >> (8 * (i if little else MAX_CHECKS - 1 - i))) & 1) for i in range(len(checks))]
