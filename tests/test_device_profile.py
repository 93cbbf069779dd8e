"""The device profile on the CPU (the GPU run uses the same code, with kernels instead of operators): every
configuration is profiled, operators are counted once (not their nested calls), and the decode profile is per
token."""

from __future__ import annotations

import pytest
import torch

from vtexit.evaluation.device_profile import profile_prefill, profile_static_decode


@torch.no_grad()
def test_profile_prefill_eager_counts_operators(llava4):
    model, inputs = llava4.model, llava4.inputs([1], text_len=5)
    rows = profile_prefill(model, inputs, [2], repeats=1)
    assert [r.layer for r in rows] == [None, 2]
    assert all(isinstance(r.wall_s, float) and r.busy_s is None and r.busy_share is None for r in rows)
    assert rows[0].kernels > 100  # every layer's operators, not just a hook's
    names = {share.name for share in rows[0].top}
    assert "aten::linear" in names and not names & {"aten::matmul", "aten::mm", "aten::addmm"}  # not nested ones
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
    assert all(isinstance(row.wall_s, float) and 0 < row.kernels for row in rows)  # a difference of times: any sign
    # a decode step runs the same compiled graph every time: 4 steps cost twice the operators of 2, so per token
    # the count does not depend on the generate's length (a generate's own operators cancel out)
    longer = profile_static_decode(model, inputs, [2], new_tokens=5, repeats=1)
    assert [row.kernels for row in longer] == [row.kernels for row in rows]
    assert getattr(model, "_vtexit_engine", None) is None  # the caller's model was never patched
