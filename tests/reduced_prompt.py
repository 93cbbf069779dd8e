"""An independent reference for pre-LLM reduction: DivPrune's greedy in float64 with plain loops, and the reduced
prompt built by hand (the kept tokens' first-layer inputs of the unpatched model, left-padded), to feed the
unpatched model as ``inputs_embeds``. Nothing in vtexit is used but the name of the cache keyword."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from vtexit.core.transformers_compat import cache_kwargs
from vtexit.testing.tiny_models import build_tiny


def keep_count(visual: int, keep: float) -> int:
    """Round half up of keep x visual, at least one when there are visual tokens (keep as an exact fraction)."""
    if visual == 0:
        return 0
    return max(1, int(Fraction(keep).limit_denominator(10**6) * visual + Fraction(1, 2)))


def greedy_by_hand(features: np.ndarray, candidates: list[int], count: int) -> set[int]:
    """Max-min diversity, greedy, in float64 with plain loops: the most isolated candidate first, then the one
    farthest from everything chosen; ties to the lower position."""
    unit = {i: features[i] / np.linalg.norm(features[i]) for i in candidates}

    def distance(i: int, j: int) -> float:
        return 1.0 - float(unit[i] @ unit[j])

    def isolation(i: int) -> float:
        others = [distance(i, j) for j in candidates if j != i]
        return min(others) if others else float("inf")

    chosen: list[int] = []
    for _ in range(count):
        rest = [i for i in candidates if i not in chosen]
        scores = [isolation(i) if not chosen else min(distance(i, j) for j in chosen) for i in rest]
        chosen.append(rest[int(np.argmax(scores))])  # argmax returns the first of equal maxima
    return set(chosen)


def layer0_inputs(model, inputs: dict) -> torch.Tensor:
    """The first decoder layer's input of the unpatched model: the prompt's embeddings with the projected visual
    features in place."""
    seen = {}
    text_model = getattr(model.model, "language_model", None) or model.model.text_model  # Idefics3's name
    first = text_model.layers[0]
    hook = first.register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return seen["h"].detach()


def reduced_prompt(case, inputs: dict, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept first-layer inputs (text, and the visual tokens the brute-force greedy chooses), left-padded
    with zero vectors, and their attention mask."""
    embeds = layer0_inputs(case.model, inputs)
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    rows = []
    for b in range(embeds.shape[0]):
        visual = media[b].nonzero().flatten().tolist()
        chosen = greedy_by_hand(embeds[b].double().numpy(), visual, keep_count(len(visual), keep)) if visual else set()
        real = inputs["attention_mask"][b].bool()
        kept = [i for i in range(embeds.shape[1]) if real[i] and (not media[b, i] or i in chosen)]
        rows.append(embeds[b, kept])
    return left_pad(rows)


def rebuild_rows(embeds: torch.Tensor, inputs: dict, media: torch.Tensor, visual) -> tuple[list, list]:
    """Walk each row's real tokens by hand: a text token is kept as it is; the k-th visual token of row ``b`` (at
    position ``i``) becomes the embeddings ``visual(b, i, k)`` returns (none: dropped). Per row the rebuilt
    embeddings and, for each, whether it is visual."""
    rows, flags = [], []
    for b in range(embeds.shape[0]):
        real = inputs["attention_mask"][b].bool()
        kept, is_visual, seen = [], [], 0
        for i in range(embeds.shape[1]):
            if not real[i]:
                continue
            if not media[b, i]:
                kept.append(embeds[b, i])
                is_visual.append(False)
                continue
            new = list(visual(b, i, seen))
            seen += 1
            kept.extend(new)
            is_visual.extend([True] * len(new))
        rows.append(torch.stack(kept))
        flags.append(is_visual)
    return rows, flags


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (length_b, hidden) embeddings left-padded with zero vectors into one batch, and its attention mask."""
    longest = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), longest, rows[0].shape[-1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    return padded, mask


def greedy_case(name: str):
    """A 4-layer tiny model of family ``name`` that generates a fixed number of tokens (no EOS, pad id 0)."""
    case = build_tiny(name, num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


@torch.no_grad()
def check_against_reduced_prompt(
    model, inputs: dict, embeds: torch.Tensor, mask: torch.Tensor, patch, steps: int, **cache
):
    """The model under ``patch(model)`` (a handle used as a context) against the unpatched model on the reduced
    prompt ``embeds`` / ``mask``: the kept slots' logits (positions differ by a constant per padded row, which rotary
    attention does not see), every layer's token count, and a cached generate's tokens and per-step logits (the
    patched generate with ``cache``, e.g. ``cache_implementation="static"``; the reference's is dynamic)."""
    reference = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    generate = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True)
    generate.update(return_dict_in_generate=True)
    reference_steps = model.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
    with patch(model) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        tokens = handle.last_cost.tokens_per_layer()
        result = model.generate(**inputs, **generate, **cache)
    assert layout.valid.sum(1).tolist() == mask.sum(1).tolist()
    torch.testing.assert_close(logits[layout.valid], reference[mask.bool()], atol=2e-5, rtol=1e-4)
    assert tokens.tolist() == [mask.sum(1).tolist()] * len(tokens)  # every layer, layer 0 too
    assert result.sequences[:, inputs["input_ids"].shape[1] :].tolist() == reference_steps.sequences.tolist()
    for step, expected in zip(result.logits, reference_steps.logits, strict=True):
        torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-4)


def decode_by_hand(model, prefill, cache, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode steps called one by one as a user's loop would, with ``attention_mask`` and no ``position_ids``
    (transformers then numbers the new tokens itself), after ``prefill`` (its output) on ``cache``: the last logits
    of the prefill and of each step, stacked."""
    logits = [prefill.logits[:, -1]]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        token = logits[-1].argmax(-1, keepdim=True)
        step = model(input_ids=token, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
        logits.append(step.logits[:, -1])
    return torch.stack(logits)
