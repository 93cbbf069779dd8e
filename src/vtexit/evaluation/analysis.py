"""What the VTW paper's two observations look like on a model: attention sinks and information migration.

* :func:`attention_by_group`: for each layer, the share of the last token's attention that lands on each token
  group (prefix before the image, visual, instruction after it, generated). VTW's first observation is that deep
  layers give visual tokens little attention (they act as a sink for the early ones only).
* :func:`accuracy_against_k`: accuracy when withdrawing at each K, next to the FLOPs saved; with the KL curve of
  :func:`vtexit.methods.vtw.calibrate` it shows where the visual information has migrated into the text tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.families import family_for
from vtexit.evaluation.batches import processor_batch
from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import EvalResult, evaluate
from vtexit.methods.vtw import withdraw

GROUPS = ("prefix", "visual", "instruction", "generated")


def _groups(media: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """(L,) group index per position of one unpadded row: 0 prefix, 1 visual, 2 instruction, 3 generated."""
    positions = torch.arange(media.shape[0])
    visual = media.nonzero().squeeze(1)
    first = int(visual[0]) if len(visual) else prompt_length
    group = torch.full_like(positions, 2)
    group[positions < first] = 0
    group[media] = 1
    group[positions >= prompt_length] = 3
    return group


@torch.no_grad()
def attention_by_group(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    *,
    new_tokens: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """(num_layers, 4) mean share of the last generated token's attention per group in :data:`GROUPS`.

    Uses eager attention for this call (the only implementation that returns attention weights).
    """
    family = family_for(model)
    tokenizer = processor.tokenizer
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    totals, rows = None, 0
    try:
        for record in tqdm(records, desc="attention by group", disable=not progress):
            inputs = processor_batch(processor, [record], prompt)  # one row: no padding
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            full = dict(inputs, input_ids=out, attention_mask=torch.ones_like(out))
            attentions = model(**full, output_attentions=True, use_cache=False).attentions
            media = family.media_mask(model.config, out[0])
            media[inputs["input_ids"].shape[1] :] = False  # a generated token may equal the image token id
            group = _groups(media, inputs["input_ids"].shape[1])
            shares = np.zeros((len(attentions), len(GROUPS)))
            for layer, weights in enumerate(attentions):
                last = weights[0, :, -1].mean(0)  # mean over heads
                for g in range(len(GROUPS)):
                    shares[layer, g] = float(last[group == g].sum())
            totals = shares if totals is None else totals + shares
            rows += 1
    finally:
        model.set_attn_implementation(previous)
    return totals / rows


def accuracy_against_k(
    model: nn.Module,
    processor,
    records: Sequence[VQARecord],
    prompt: Callable[[str], str],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, EvalResult]:
    """Evaluate VTW at each K in ``layers`` on the same records."""
    return {
        k: evaluate(
            model,
            processor,
            records,
            prompt,
            method=lambda m, k=k: withdraw(m, layer=k),
            name=f"VTW K={k}",
            batch_size=batch_size,
            progress=progress,
        )
        for k in layers
    }
