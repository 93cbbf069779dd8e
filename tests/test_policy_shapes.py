"""The engine contract, checked for every policy shape on every family and both attention implementations.

Policies here are small test clients of the contract: per-row exits at different layers, a partial keep of a fixed
subset per row, two events in one prefill, and a keep ranked by attention scores. Each is checked against decoder
layers run by hand on the positions it keeps (tests/reference.py, with Gemma3's image blocks built by hand), and
cached greedy generation against a no-cache recomputation.
"""

from __future__ import annotations

import torch
from conftest import family_batch
from reference import greedy_no_cache, image_blocks, record_layer_inputs, scheduled_logits

import vtexit

NEW_TOKENS = 4


class PerRowExit(vtexit.Policy):
    """Row b drops all its visual tokens before its own layer ``layers[b]``."""

    def __init__(self, layers: list[int]):
        self.layers = torch.tensor(layers)

    def keep(self, view):
        exits = (self.layers.to(view.media.device) == view.layer_idx).unsqueeze(1)
        if not bool(exits.any()):
            return None
        return view.layout.valid & ~(view.media & exits)


class FixedSubset(vtexit.Policy):
    """Before ``layer``, row b keeps every text token and the visual tokens at even original positions."""

    def __init__(self, layer: int):
        self.layer = layer

    def keep(self, view):
        if view.layer_idx != self.layer:
            return None
        return view.layout.valid & ~(view.media & (view.layout.index % 2 == 1))


class TwoEvents(vtexit.Policy):
    """Half of the visual tokens (odd original positions) leave at ``first``, the rest at ``second``."""

    def __init__(self, first: int, second: int):
        self.first, self.second = first, second

    def keep(self, view):
        if view.layer_idx == self.first:
            return view.layout.valid & ~(view.media & (view.layout.index % 2 == 1))
        if view.layer_idx == self.second:
            return view.text
        return None


class TopAttention(vtexit.Policy):
    """FastV-shaped: before ``layer`` keep the ``count`` visual tokens the last prompt token attends to most at
    ``layer - 1`` (scores from the contract)."""

    def __init__(self, layer: int, count: int):
        self.layer, self.count = layer, count
        self.attention_layers = (layer - 1,)
        self.seen_scores = None

    def keep(self, view):
        if view.layer_idx != self.layer:
            return None
        scores = view.attention(self.layer - 1)
        self.seen_scores = scores
        ranked = scores.masked_fill(~view.media, float("-inf"))
        top = ranked.topk(min(self.count, ranked.shape[1]), dim=1).indices
        chosen = torch.zeros_like(view.media).scatter(1, top, True) & view.media
        return view.text | chosen


def _schedules(case, inputs):
    """(name, policy, per row: list of (layer, kept original positions)) for the deterministic policies."""
    low, n = vtexit.valid_layer_range(case.model)
    media = case.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    rows = range(media.shape[0])
    positions = [real[b].nonzero().squeeze(1) for b in rows]
    text = [(real[b] & ~media[b]).nonzero().squeeze(1) for b in rows]
    odd_media = [(real[b] & media[b] & (torch.arange(media.shape[1]) % 2 == 1)) for b in rows]
    half = [(real[b] & ~odd_media[b]).nonzero().squeeze(1) for b in rows]
    exits = [low, n - 1, (low + n) // 2]
    mid = (low + n) // 2
    second = min(mid + 1, n - 1)
    return [
        ("per-row exits", PerRowExit(exits), [[(exits[b], text[b])] for b in rows]),
        ("fixed subset", FixedSubset(low), [[(low, half[b])] for b in rows]),
        ("two events", TwoEvents(low, second), [[(low, half[b]), (second, text[b])] for b in rows]),
    ], positions


def _blocks(case, inputs):
    if case.name != "gemma3":
        return None
    return image_blocks(inputs["token_type_ids"])


@torch.no_grad()
def test_policies_match_layers_run_by_hand(case):
    inputs = family_batch(case)
    base = case.model(**inputs).logits
    seen = record_layer_inputs(case.model, inputs)
    blocks = _blocks(case, inputs)
    schedules, _ = _schedules(case, inputs)
    for name, policy, events in schedules:
        with vtexit.apply_policy(case.model, policy) as handle:
            logits = case.model(**inputs).logits
            layout = handle.last_layout
        for b, row_events in enumerate(events):
            expected = scheduled_logits(case.model, seen, b, row_events, None if blocks is None else blocks[b])
            got = logits[b][layout.valid[b]]
            assert torch.equal(layout.index[b][layout.valid[b]], row_events[-1][1]), f"{name} row {b}"
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"{name} row {b}")
    assert torch.equal(case.model(**inputs).logits, base)  # every patch removed: the model is as it was


@torch.no_grad()
def test_policies_cached_generate_equals_no_cache(case):
    inputs = family_batch(case)
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    schedules, _ = _schedules(case, inputs)
    # Not the attention-ranked policy: a no-cache recomputation re-ranks from each new last token.
    for _, policy, _ in schedules:
        with vtexit.apply_policy(case.model, policy):
            generated = case.model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids
            )
            expected = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
        assert torch.equal(generated, expected), type(policy).__name__


@torch.no_grad()
def test_attention_ranked_keep_matches_eager_attentions(case):
    inputs = family_batch(case)
    low, n = vtexit.valid_layer_range(case.model)
    layer = max(low, 2)
    policy = TopAttention(layer, 3)
    with vtexit.apply_policy(case.model, policy) as handle:
        logits = case.model(**inputs).logits
        layout = handle.last_layout
    # Reference scores: an eager forward with output_attentions, last prompt row, mean over heads.
    impl = case.model.config._attn_implementation
    case.model.set_attn_implementation("eager")
    try:
        attentions = case.model(**inputs, output_attentions=True).attentions[layer - 1]
    finally:
        case.model.set_attn_implementation(impl)
    reference = attentions[:, :, -1, :].float().mean(dim=1)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(policy.seen_scores, reference * real, atol=1e-5, rtol=1e-4)
    media = case.media_mask(inputs)
    seen = record_layer_inputs(case.model, inputs)
    blocks = _blocks(case, inputs)
    for b in range(media.shape[0]):
        candidates = (media[b] & real[b]).nonzero().squeeze(1)
        top = candidates[reference[b, candidates].topk(min(3, len(candidates))).indices]
        kept = ((real[b] & ~media[b]) | torch.zeros_like(media[b]).index_fill(0, top, True)).nonzero().squeeze(1)
        assert torch.equal(layout.index[b][layout.valid[b]], kept), f"row {b}"
        expected = scheduled_logits(case.model, seen, b, [(layer, kept)], None if blocks is None else blocks[b])
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)
