"""Host-device syncs a patch adds, counted with torch.profiler (``aten::_local_scalar_dense``, which CPU runs record
as well): one per prefill, one per compaction event, none per decode step. The unpatched model is the reference."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import vtexit


def _count(fn, op: str) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == op)


def _syncs(fn) -> int:
    return _count(fn, "aten::_local_scalar_dense")


class _TwoEvents(vtexit.Policy):
    event_layers = frozenset({1, 3})

    def keep(self, view):
        if view.layer_idx == 1:
            return view.layout.valid & ~(view.media & (view.layout.index % 2 == 1))
        return view.text


@torch.no_grad()
def test_syncs_per_prefill_event_and_decode_step(llava4):
    model = llava4.model
    inputs = llava4.inputs([1, 2], text_len=[5, 3])  # left-padded: the caller's mask has zeros
    prefill = _syncs(lambda: model(**inputs))
    with vtexit.withdraw(model, layer=4):  # K = N: hooks, no event
        assert _syncs(lambda: model(**inputs)) <= prefill + 1
    with vtexit.withdraw(model, layer=2):
        assert _syncs(lambda: model(**inputs)) <= prefill + 2
    with vtexit.apply_policy(model, _TwoEvents()):
        assert _syncs(lambda: model(**inputs)) <= prefill + 3

    def generate(steps: int):
        return lambda: model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    per_steps_unpatched = _syncs(generate(6)) - _syncs(generate(3))
    with vtexit.withdraw(model, layer=2):
        per_steps_patched = _syncs(generate(6)) - _syncs(generate(3))
    assert per_steps_patched == per_steps_unpatched  # three more decode steps cost no extra sync


@torch.no_grad()
def test_static_cache_syncs_per_prefill_and_decode_step(llava4):
    """On a static cache: the prefill adds at most its one read (the cache's emptiness is read with the layout
    flags), and decode steps add none (the plan kept on the cache replaces the per-step length read)."""
    model = llava4.model
    inputs = llava4.inputs([1, 2], text_len=[5, 3])

    def generate(steps: int):
        gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, cache_implementation="static")
        return lambda: model.generate(**inputs, **gen)

    first_unpatched = _syncs(generate(1))
    per_steps_unpatched = _syncs(generate(6)) - _syncs(generate(3))
    with vtexit.withdraw(model, layer=2):
        assert _syncs(generate(1)) <= first_unpatched + 2  # the prefill's read and its compaction event
        per_steps_patched = _syncs(generate(6)) - _syncs(generate(3))
    assert per_steps_patched == per_steps_unpatched


def test_read_checks_reads_every_pattern_in_one_counted_sync():
    from itertools import product

    from vtexit.core.host_read import read_checks

    for n in (1, 2, 4, 5, 8):
        for bits in product([False, True], repeat=n):
            checks = [torch.tensor(b) for b in bits]
            assert read_checks(checks) == list(bits)
    checks = [torch.tensor(True), torch.tensor(False), torch.tensor(True)]
    assert _syncs(lambda: read_checks(checks)) == 1


@torch.no_grad()
def test_yopo_dense_prefill_reads_once_and_builds_no_row_blocks(llava4):
    """YOPO's choice between split and dense rides on the prefill's one read (Policy.prefill_checks): a dense
    prefill adds that read only and never builds the split path's row blocks (their sorts, and their widths' read,
    which ``tolist`` makes without a profiler record)."""
    model = llava4.model
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    prefill, sorts = _syncs(lambda: model(**inputs)), _count(lambda: model(**inputs), "aten::sort")
    for dense_below in (10**9, 1):
        with vtexit.yopo(model, vtexit.YOPOConfig(ffn_ratio=2, dense_below=dense_below)) as handle:
            assert _syncs(lambda: model(**inputs)) == prefill + 1
            dense = handle.last_cost.prefill.layers[0].ffn_fraction == 1.0  # dense ran the full FFN
            assert dense == (dense_below > 1)
            assert (_count(lambda: model(**inputs), "aten::sort") == sorts) == dense


class _AsksTooMuch(vtexit.Policy):
    def __init__(self, names):
        self.names = names

    def prefill_checks(self, media, layout):
        return {name: media.any() for name in self.names}


@torch.no_grad()
def test_policy_prefill_checks_are_bounded_and_named(llava4):
    from vtexit.core.policy import PREFILL_CHECKS

    model = llava4.model
    inputs = llava4.inputs([1], text_len=4)
    for names in ([f"c{i}" for i in range(PREFILL_CHECKS + 1)], ["media"]):
        with vtexit.apply_policy(model, _AsksTooMuch(names)), pytest.raises(ValueError, match="prefill_checks"):
            model(**inputs)
    with vtexit.apply_policy(model, _AsksTooMuch(["a", "b"])):
        model(**inputs)
        engine = model._vtexit_engine
        with pytest.raises(ValueError, match="outside a prefill"):
            engine.prefill_check("a")  # outside the call
