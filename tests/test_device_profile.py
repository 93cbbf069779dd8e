"""The device profile on the CPU (the GPU run uses the same code, with kernels instead of operators): every
configuration is profiled, the counts are the profiler's own, and the decode profile is per token."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vtexit.evaluation.device_profile import profile_prefill, profile_static_decode


def _top_level_ops(fn) -> int:
    """Top-level aten operators of one call, counted by hand from the profiler's events."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if not nested(e))


@torch.no_grad()
def test_profile_prefill_eager_counts_operators(llava4):
    model, inputs = llava4.model, llava4.inputs([1], text_len=5)
    rows = profile_prefill(model, inputs, [2], repeats=1)
    assert [r.layer for r in rows] == [None, 2]
    assert all(r.wall_s > 0 and r.busy_s is None and r.busy_share is None for r in rows)
    assert rows[0].kernels == _top_level_ops(lambda: model(**inputs, use_cache=False, logits_to_keep=1))
    for row in rows:
        assert len(row.top) == 8 and all(a.seconds >= b.seconds for a, b in zip(row.top, row.top[1:], strict=False))
        assert all(share.name.startswith("aten::") and share.calls >= 1 for share in row.top)
    with pytest.raises(ValueError, match="compile_mode"):
        profile_prefill(model, inputs, [2], compile_mode="max-autotune")


@torch.no_grad()
def test_profile_static_decode_is_per_token(llava4):
    model, inputs = llava4.model, llava4.inputs([1], text_len=5)
    rows = profile_static_decode(model, inputs, [2], new_tokens=3, repeats=1)
    assert [r.layer for r in rows] == [None, 2]
    for row in rows:
        # the difference of a 3-token and a 1-token generate over its 2 decode steps: a step's ops, not a generate's
        assert 0 < row.wall_s and 0 < row.kernels
    assert getattr(model, "_vtexit_engine", None) is None  # the caller's model was never patched
