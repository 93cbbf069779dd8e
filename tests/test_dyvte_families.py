"""DyVTE on every family and both attention implementations: per-row exits inside one batch are exact.

Gates have random weights; each gate's exit bias is set from gate logits computed *by hand* on the unpatched
model's hidden states (features written out here, not vtexit's), so that one row with visual tokens exits at the
first gated layer, the others at the last, and rows without them would exit too if they could. Each row's logits
must then equal decoder layers run by hand with its visual tokens gone from its own exit layer on
(tests/reference.py), rows without visual tokens the unpatched model's, and cached greedy generation a no-cache
recomputation under VTW at that row's layer.
"""

from __future__ import annotations

import torch
from conftest import family_batch
from reference import greedy_no_cache, image_blocks, record_layer_inputs, scheduled_logits

import vtexit

NEW_TOKENS = 4
NEVER = -1e4


def hand_features(seen: list, layer: int, inputs: dict, media: torch.Tensor) -> torch.Tensor:
    """Per row: [mean hidden state of the text after the last visual token, without the last real token; hidden
    state of the last real token], from the input of ``layer`` in an unpatched forward."""
    hidden = seen[layer][0]
    real = inputs["attention_mask"].bool()
    rows = []
    for b in range(hidden.shape[0]):
        positions = real[b].nonzero().squeeze(1).tolist()
        last = positions[-1]
        visual = media[b].nonzero().squeeze(1).tolist()
        start = visual[-1] + 1 if visual else 0
        after = [p for p in positions if p >= start and p != last and not media[b, p]]
        mean = hidden[b, after].mean(0) if after else torch.zeros_like(hidden[b, 0])
        rows.append(torch.cat([mean, hidden[b, last]]))
    return torch.stack(rows)


def crafted_gates(case, inputs) -> tuple[vtexit.DyVTEGates, list[int], list]:
    """Random gates whose biases make the highest-scoring row with visual tokens exit at the first gated layer and
    every other row at the last one; every other gate never fires. Returns the gates, the expected exits and the
    recorded layer inputs of the unpatched model."""
    low, n = vtexit.valid_layer_range(case.model)
    torch.manual_seed(0)
    gates = vtexit.DyVTEGates.for_model(case.model, gate_size=8)
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    has_media = media.any(1)
    seen = record_layer_inputs(case.model, inputs)
    first, last = low, n - 1
    assert first < last
    with torch.no_grad():
        for k in gates.layers:
            gates.gates[str(k)].fc2.bias[1] = NEVER
        margins = {}
        for k in (first, last):
            gates.gates[str(k)].fc2.bias.zero_()
            logits = gates(k, hand_features(seen, k, inputs, media))
            margins[k] = logits[:, 1] - logits[:, 0]
        candidates = margins[first].masked_fill(~has_media, float("-inf"))
        top = int(candidates.argmax())
        runner_up = candidates.masked_fill(torch.arange(len(candidates)) == top, float("-inf")).max()
        gates.gates[str(first)].fc2.bias[1] = -float(candidates[top] + runner_up) / 2  # only `top` passes 0
        gates.gates[str(last)].fc2.bias[1] = 1.0 - float(margins[last].min())  # every row passes 0
    expected = [first if b == top else last if has_media[b] else n for b in range(len(has_media))]
    assert len({e for e, m in zip(expected, has_media, strict=True) if m}) == 2  # two exit layers in one batch
    return gates, expected, seen


@torch.no_grad()
def test_rows_exit_at_their_own_layer_exactly(case):
    inputs = family_batch(case)
    gates, expected, seen = crafted_gates(case, inputs)
    n = vtexit.valid_layer_range(case.model)[1]
    base = case.model(**inputs).logits
    media = case.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    blocks = image_blocks(inputs["token_type_ids"]) if case.name == "gemma3" else None
    with vtexit.dyvte(case.model, gates) as handle:
        logits = case.model(**inputs).logits
        layout = handle.last_layout
        assert handle.exit_layers == expected
    for b, exit_layer in enumerate(expected):
        got = logits[b][layout.valid[b]]
        if exit_layer == n:  # never exits: the unpatched row (a row without visual tokens, whatever its gate says)
            torch.testing.assert_close(got, base[b][real[b]], atol=2e-5, rtol=1e-4, msg=f"row {b}")
            continue
        text = (real[b] & ~media[b]).nonzero().squeeze(1)
        reference = scheduled_logits(case.model, seen, b, [(exit_layer, text)], None if blocks is None else blocks[b])
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4, msg=f"row {b}")
        assert torch.equal(layout.index[b][layout.valid[b]], text)
    assert handle.exit_layers == expected  # still readable after the patch is removed
    assert torch.equal(case.model(**inputs).logits, base)


@torch.no_grad()
def test_cached_generate_equals_no_cache_recomputation_per_exit_layer(case):
    inputs = family_batch(case)
    gates, expected, _ = crafted_gates(case, inputs)
    n = vtexit.valid_layer_range(case.model)[1]
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    with vtexit.dyvte(case.model, gates) as handle:
        generated = case.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids)
        assert handle.exit_layers == expected
    for layer in sorted(set(expected)):
        rows = [b for b, e in enumerate(expected) if e == layer]
        if layer == n:
            reference = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
        else:
            with vtexit.withdraw(case.model, layer=layer):
                reference = greedy_no_cache(case.model, inputs, NEW_TOKENS, suppress=media_ids)
        assert torch.equal(generated[rows], reference[rows]), f"rows {rows} exiting at {layer}"
