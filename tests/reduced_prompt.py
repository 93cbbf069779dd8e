"""An independent reference for pre-LLM reduction: DivPrune's greedy in float64 with plain loops, and the reduced
prompt built by hand (the kept tokens' first-layer inputs of the unpatched model, left-padded), to feed the
unpatched model as ``inputs_embeds``. Nothing in vtexit is used."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch


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
    first = model.model.language_model.layers[0]
    hook = first.register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return seen["h"]


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
    longest = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), longest, embeds.shape[-1], dtype=embeds.dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    return padded, mask
