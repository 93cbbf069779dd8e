"""FastV, PyramidDrop and the random drop on every family, with SDPA and eager attention.

References, all independent of vtexit:

* **Which tokens stay.** FastV: the ranking of an eager ``output_attentions`` run (last prompt row, mean over heads).
  PyramidDrop: stage by stage, the attention of layers run by hand (``tests/reference.py``) under eager attention on
  the tokens the earlier stages kept, captured from the attention module's own probabilities. Random drop: the
  documented rule (the i-th visual token of a row gets the i-th value of ``torch.rand`` from the seeded generator),
  recomputed here. Counts: round half up of ``keep x V`` computed with exact fractions here, at least one.
* **Logits.** Decoder layers run by hand on the kept positions (``scheduled_logits``), row by row.
* **Cached generate.** A no-cache recomputation re-ranks attention from each new last token, so for FastV and
  PyramidDrop it is not the same schedule. Their cached ``generate`` is compared with a no-cache recomputation under
  a test policy that replays the positions the prefill kept (new tokens are text and stay): the cache must hold
  exactly what recomputing that schedule from scratch gives. Which positions the prefill keeps is checked by the
  references above. The random drop depends only on the visual tokens, so it is compared with a plain no-cache
  recomputation under the patch.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from conftest import family_batch
from reference import greedy_no_cache, image_blocks, record_layer_inputs, scheduled_logits

import vtexit
from vtexit.core.layout import Layout
from vtexit.core.policy import PrefillView
from vtexit.methods.fastv.ranking import keep_top

NEW_TOKENS = 3
RENUMBER_REFUSED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}  # multimodal RoPE has no renumbering


def expected_count(keep: float, visual: int) -> int:
    """Round half up of keep x visual with exact decimal arithmetic; at least one when there are visual tokens."""
    if visual == 0:
        return 0
    return max(1, math.floor(Fraction(str(keep)) * visual + Fraction(1, 2)))


def top_positions(positions: list[int], scores: list[float], media: list[bool], keep: float) -> list[int]:
    """Text positions plus the top visual ones by score (ties: lower position first), in position order."""
    visual = [i for i, m in enumerate(media) if m]
    chosen = sorted(visual, key=lambda i: (-scores[i], positions[i]))[: expected_count(keep, len(visual))]
    return [p for i, p in enumerate(positions) if not media[i] or i in chosen]


def _blocks(case, inputs, b):
    return image_blocks(inputs["token_type_ids"])[b] if case.name == "gemma3" else None


def _kept_positions(mask_row: torch.Tensor) -> torch.Tensor:
    return mask_row.nonzero().squeeze(1)


class _Eager:
    """The model under eager attention inside the block, then back to what it was."""

    def __init__(self, model):
        self.model, self.impl = model, model.config._attn_implementation

    def __enter__(self):
        self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.impl)


def _decoder_layers(model):
    core = model.model
    return (core.text_model if hasattr(core, "text_model") else core.language_model).layers


def _hand_attention(model, seen, b, events, layer, blocks, renumber) -> torch.Tensor:
    """Row b's last-token attention (mean over heads) at ``layer``, over the positions that layer holds, taken from
    the attention module's own probabilities while the layers run by hand under eager attention."""
    captured = {}

    def hook(module, args, output):
        captured["weights"] = output[1]

    handle = _decoder_layers(model)[layer].self_attn.register_forward_hook(hook)
    try:
        scheduled_logits(model, seen, b, events, blocks, renumber)
    finally:
        handle.remove()
    return captured["weights"][0, :, -1, :].float().mean(0)


class Replay(vtexit.Policy):
    """Keeps, before each recorded layer, the original positions a real prefill kept; tokens after the prompt are
    text and stay."""

    def __init__(self, kept: dict[int, torch.Tensor], renumber: bool = False):
        self.kept = kept
        self.renumber_positions = renumber

    def keep(self, view):
        if view.layer_idx not in self.kept:
            return None
        recorded = self.kept[view.layer_idx]
        full = torch.ones_like(view.media_original)
        full[:, : recorded.shape[1]] = recorded
        return full.gather(1, view.layout.index) & view.layout.valid


def _media_ids(case, inputs):
    return sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))


def _check_cached_generate_replays(case, inputs, verb, renumber=False):
    media_ids = _media_ids(case, inputs)
    with verb(case.model) as handle:
        generated = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids)
        kept = dict(handle.last_policy_state["kept"])
    with vtexit.apply_policy(case.model, Replay(kept, renumber)):
        expected = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
    assert torch.equal(generated, expected)


# ------------------------------------------------------------------------------------------- FastV
@torch.no_grad()
def test_fastv_keeps_the_eager_ranking_and_matches_layers_by_hand(case):
    inputs = family_batch(case)
    low, _ = vtexit.valid_layer_range(case.model)
    layer, keep = max(low, 2), 0.3  # 0.3 rounds: 16 -> 5, 4 -> 1, 18 -> 5, 9 -> 3, 32 -> 10 (half up)
    with vtexit.fastv(case.model, layer=layer, keep=keep) as handle:
        logits = case.model(**inputs).logits
        layout, state = handle.last_layout, handle.last_policy_state
    with _Eager(case.model):
        attentions = case.model(**inputs, output_attentions=True).attentions[layer - 1]
    scores = attentions[:, :, -1, :].float().mean(dim=1)
    media, real = case.media_mask(inputs), inputs["attention_mask"].bool()
    seen = record_layer_inputs(case.model, inputs)
    for b in range(media.shape[0]):
        positions = real[b].nonzero().squeeze(1)
        kept = top_positions(positions.tolist(), scores[b, positions].tolist(), media[b, positions].tolist(), keep)
        kept = torch.tensor(kept)
        assert torch.equal(layout.index[b][layout.valid[b]], kept), f"row {b}"
        assert torch.equal(_kept_positions(state["kept"][layer][b]), kept), f"row {b}"
        expected = scheduled_logits(case.model, seen, b, [(layer, kept)], _blocks(case, inputs, b))
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4, msg=f"row {b}")


@torch.no_grad()
def test_fastv_cached_generate_equals_no_cache_of_its_schedule(case):
    inputs = family_batch(case)
    low, _ = vtexit.valid_layer_range(case.model)
    _check_cached_generate_replays(case, inputs, lambda m: vtexit.fastv(m, layer=max(low, 2), keep=0.5))


# ------------------------------------------------------------------------------------------- PyramidDrop
def _pdrop_reference(case, inputs, layers, keep, renumber) -> list[list[tuple[int, torch.Tensor]]]:
    """Per row, the (stage layer, kept positions) events, each stage ranked by layers run by hand under eager."""
    media, real = case.media_mask(inputs), inputs["attention_mask"].bool()
    events_per_row = []
    with _Eager(case.model):
        seen = record_layer_inputs(case.model, inputs)
        for b in range(media.shape[0]):
            current = real[b].nonzero().squeeze(1)
            events = [(0, current)]  # row b alone, run by hand from the first layer
            for layer in layers:
                scores = _hand_attention(case.model, seen, b, events, layer - 1, _blocks(case, inputs, b), renumber)
                kept = top_positions(current.tolist(), scores.tolist(), media[b, current].tolist(), keep)
                current = torch.tensor(kept)
                events.append((layer, current))
            events_per_row.append(events[1:])
    return events_per_row


def _check_pdrop(case, inputs, layers, keep, renumber):
    with vtexit.pdrop(case.model, layers=layers, keep=keep, renumber=renumber) as handle:
        logits = case.model(**inputs).logits
        layout, state = handle.last_layout, handle.last_policy_state
    reference = _pdrop_reference(case, inputs, layers, keep, renumber)
    seen = record_layer_inputs(case.model, inputs)
    for b, events in enumerate(reference):
        for layer, kept in events:
            assert torch.equal(_kept_positions(state["kept"][layer][b]), kept), f"row {b}, stage {layer}"
        assert torch.equal(layout.index[b][layout.valid[b]], events[-1][1]), f"row {b}"
        expected = scheduled_logits(case.model, seen, b, events, _blocks(case, inputs, b), renumber)
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4, msg=f"row {b}")


@torch.no_grad()
def test_pdrop_stages_match_attention_of_layers_run_by_hand(case):
    inputs = family_batch(case)
    low, n = vtexit.valid_layer_range(case.model)
    layers = tuple(range(low, n))  # every allowed stage: (1, 2, 3) or (2, 3)
    _check_pdrop(case, inputs, layers, 0.5, renumber=False)
    if case.name in RENUMBER_REFUSED:
        before = case.model(**inputs).logits
        with pytest.raises(ValueError, match="renumber"):
            vtexit.pdrop(case.model, layers=layers, renumber=True)
        assert getattr(case.model, "_vtexit_engine", None) is None
        assert torch.equal(case.model(**inputs).logits, before)
    else:
        _check_pdrop(case, inputs, layers, 0.5, renumber=True)


@torch.no_grad()
def test_pdrop_cached_generate_equals_no_cache_of_its_schedule(case):
    inputs = family_batch(case)
    low, n = vtexit.valid_layer_range(case.model)
    layers = tuple(range(low, n))
    _check_cached_generate_replays(case, inputs, lambda m: vtexit.pdrop(m, layers=layers, keep=0.5))
    if case.name not in RENUMBER_REFUSED:
        verb = lambda m: vtexit.pdrop(m, layers=layers, keep=0.5, renumber=True)  # noqa: E731
        _check_cached_generate_replays(case, inputs, verb, renumber=True)


# ------------------------------------------------------------------------------------------- random drop
def _random_reference(media_row: list[bool], positions: list[int], keep: float, seed: int) -> list[int]:
    """The documented rule: the i-th visual token gets the i-th value of torch.rand from the seeded generator."""
    values = torch.rand(4096, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    scores, ordinal = [], 0
    for is_media in media_row:
        scores.append(values[ordinal] if is_media else 0.0)
        ordinal += int(is_media)
    return top_positions(positions, scores, media_row, keep)


@torch.no_grad()
def test_random_drop_follows_its_seed_and_matches_layers_by_hand(case):
    inputs = family_batch(case)
    low, _ = vtexit.valid_layer_range(case.model)
    layer, keep, seed = max(low, 2), 0.3, 7
    with vtexit.random_drop(case.model, layer=layer, keep=keep, seed=seed) as handle:
        logits = case.model(**inputs).logits
        layout = handle.last_layout
        media_ids = _media_ids(case, inputs)
        generated = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids)
        expected_ids = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
    assert torch.equal(generated, expected_ids)  # same kept set at every no-cache step: it depends on the seed only
    media, real = case.media_mask(inputs), inputs["attention_mask"].bool()
    seen = record_layer_inputs(case.model, inputs)
    for b in range(media.shape[0]):
        positions = real[b].nonzero().squeeze(1)
        kept = torch.tensor(_random_reference(media[b, positions].tolist(), positions.tolist(), keep, seed))
        assert torch.equal(layout.index[b][layout.valid[b]], kept), f"row {b}"
        expected = scheduled_logits(case.model, seen, b, [(layer, kept)], _blocks(case, inputs, b))
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4, msg=f"row {b}")


# ------------------------------------------------------------------------------------------- settings, rules
def test_kept_counts_round_half_up_and_ties_go_to_the_lower_position():
    """keep_top against brute force on a synthetic layout with ties and padding."""
    torch.manual_seed(0)
    batch, length = 4, 23
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    media_original = torch.rand(batch, length) < 0.6
    media_original[2] = False  # a row without visual tokens
    media_original[:, -1] = False
    scores = torch.randint(0, 4, (batch, length)).float()  # many ties
    layout = Layout(index=torch.arange(length).expand(batch, length), valid=valid)
    view = PrefillView(1, layout, media_original, torch.zeros(batch, length, 2))
    for keep in (0.1, 0.25, 0.3, 0.35, 1 / 3, 0.5, 0.7, 0.999, 1.0):
        got = keep_top(view, scores, keep)
        for b in range(batch):
            positions = valid[b].nonzero().squeeze(1).tolist()
            media = [bool(media_original[b, p]) for p in positions]
            expected = top_positions(positions, [float(scores[b, p]) for p in positions], media, keep)
            assert got[b].nonzero().squeeze(1).tolist() == expected, (keep, b)


@torch.no_grad()
def test_bad_settings_are_refused_by_name_and_leave_the_model_untouched(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    model = llava4.model
    before = model(**inputs).logits
    bad = [
        ("keep", lambda: vtexit.fastv(model, layer=2, keep=0)),
        ("keep", lambda: vtexit.fastv(model, layer=2, keep=1.5)),
        ("keep", lambda: vtexit.fastv(model, layer=2, keep=float("nan"))),
        ("keep", lambda: vtexit.fastv(model, layer=2, keep=True)),
        ("layer", lambda: vtexit.fastv(model, layer=0, keep=0.5)),
        ("layer", lambda: vtexit.fastv(model, layer=4, keep=0.5)),  # 4 layers: a drop before layer 4 does nothing
        ("layer", lambda: vtexit.fastv(model, layer=2.0, keep=0.5)),
        ("layers", lambda: vtexit.pdrop(model, layers=(2, 2), keep=0.5)),
        ("layers", lambda: vtexit.pdrop(model, layers=(3, 1), keep=0.5)),
        ("layers", lambda: vtexit.pdrop(model, layers=(), keep=0.5)),
        ("layers", lambda: vtexit.pdrop(model)),  # default stages 8/16/24 need a deeper model
        ("keep", lambda: vtexit.pdrop(model, layers=(1, 2), keep=-0.5)),
        ("renumber", lambda: vtexit.pdrop(model, layers=(1, 2), renumber="yes")),
        ("layer", lambda: vtexit.random_drop(model, layer=5, keep=0.5)),
        ("keep", lambda: vtexit.random_drop(model, layer=2, keep=0)),
        ("seed", lambda: vtexit.random_drop(model, layer=2, keep=0.5, seed=-1)),
        ("seed", lambda: vtexit.random_drop(model, layer=2, keep=0.5, seed=1.5)),
    ]
    for name, attempt in bad:
        with pytest.raises(ValueError, match=name):
            attempt()
        assert getattr(model, "_vtexit_engine", None) is None, name
    assert torch.equal(model(**inputs).logits, before)


@torch.no_grad()
def test_configs_round_trip_and_keep_one_drops_nothing(llava4):
    configs = [
        vtexit.FastVConfig(layer=2, keep=0.5),
        vtexit.PDropConfig(layers=(1, 3), keep=0.25, renumber=True),
        vtexit.RandomDropConfig(layer=2, keep=0.5, seed=3),
    ]
    for config in configs:
        assert vtexit.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    text = {"method": "pdrop", "layers": "1,3", "keep": "0.25", "renumber": "true"}  # CLI / plugin strings
    assert vtexit.config_from_dict(text) == configs[1]
    assert vtexit.config_from_dict({"method": "pdrop", "layers": "1 3", "keep": 0.25, "renumber": True}) == configs[1]
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    base = llava4.model(**inputs).logits
    for verb in (
        lambda m: vtexit.fastv(m, layer=2, keep=1.0),
        lambda m: vtexit.pdrop(m, layers=(1, 3), keep=1),
        lambda m: vtexit.random_drop(m, layer=2, keep=1.0),
    ):
        with verb(llava4.model) as handle:
            out = llava4.model(**inputs).logits
            assert handle.last_layout.valid.sum().item() == inputs["attention_mask"].sum().item()
        torch.testing.assert_close(out, base, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_random_drop_rows_do_not_depend_on_the_batch_and_seeds_differ(llava4):
    """A row keeps the same visual ordinals alone and in any batch (other rows, padding): only the seed and its
    number of visual tokens decide."""

    def kept_ordinals(inputs, seed):
        with vtexit.random_drop(llava4.model, layer=2, keep=0.5, seed=seed) as handle:
            llava4.model(**inputs)
            kept = handle.last_policy_state["kept"][2]
        media = llava4.media_mask(inputs) & inputs["attention_mask"].bool()
        return [kept[b][media[b]].nonzero().squeeze(1).tolist() for b in range(media.shape[0])]

    batch = kept_ordinals(llava4.inputs([1, 2, 1], text_len=[5, 3, 8]), seed=0)
    alone = kept_ordinals(llava4.inputs([1], text_len=[2], seed=4), seed=0)
    assert batch[0] == batch[2] == alone[0]  # one image each: same ordinals, whatever the padding and the batch
    assert len(batch[1]) == 2 * len(batch[0])
    assert kept_ordinals(llava4.inputs([1], text_len=[2], seed=4), seed=1) != alone


def _syncs(fn) -> int:
    """Host-device syncs of ``fn``, counted with torch.profiler (as tests/test_host_syncs.py does)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::_local_scalar_dense")


@torch.no_grad()
def test_baselines_add_no_host_sync_beyond_the_engine(llava4):
    """The engine reads the host once per prefill and once per event; the ranking itself adds none, and decode
    steps none at all."""
    model = llava4.model
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    prefill = _syncs(lambda: model(**inputs))
    cases = [
        (lambda: vtexit.fastv(model, layer=2, keep=0.5), 1),
        (lambda: vtexit.pdrop(model, layers=(1, 3), keep=0.5), 2),
        (lambda: vtexit.random_drop(model, layer=2, keep=0.5), 1),
    ]

    def generate(steps: int):
        return lambda: model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

    per_steps_unpatched = _syncs(generate(5)) - _syncs(generate(3))
    for verb, events in cases:
        with verb():
            model(**inputs)  # the random drop draws its values once per device here
            assert _syncs(lambda: model(**inputs)) <= prefill + 1 + events
            assert _syncs(generate(5)) - _syncs(generate(3)) == per_steps_unpatched
