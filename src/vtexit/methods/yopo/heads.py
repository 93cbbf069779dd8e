"""Which attention heads visual tokens need, per layer: YOPO's head scoring on a calibration set.

As in the public YOPO code (arXiv 2410.06169): a head's score on one sample is the attention mass its queries put
on visual keys over the mass they put on text (system + prompt) keys, summed over the sample's query rows; a head
passes on a sample when its score is above a threshold, and stays active for visual tokens when it passes on more
than ``vote`` of the samples; layers 0 and 1 keep every head. The public code fixes the threshold (0.035 / 0.077 /
0.2 for about 75% / 50% / 25% of heads on LLaVA); ``keep`` picks it instead as the score quantile that leaves
about that share of heads passing. Scores come from q/k recomputed under the model's own attention inputs (the
contract's attention scores), so no eager attention is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.attention_scores import query_attention
from vtexit.core.families import FamilySpec, family_for

ALWAYS_ACTIVE_LAYERS = 2  # the public code keeps every head of layers 0-1


@dataclass(frozen=True)
class HeadMask:
    """``active[layer, head]``: the head computes for visual query rows. Saves as safetensors or JSON."""

    active: torch.Tensor  # (layers, heads) bool

    def __post_init__(self):
        active = torch.as_tensor(self.active)
        if active.ndim != 2 or active.dtype != torch.bool:
            raise ValueError(f"heads must be a (layers, heads) bool mask, got {tuple(active.shape)} {active.dtype}")
        object.__setattr__(self, "active", active.cpu())

    @property
    def fraction(self) -> float:
        """Share of all heads active for visual tokens."""
        return float(self.active.float().mean())

    def to_lists(self) -> list[list[bool]]:
        return self.active.tolist()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps({"active": self.to_lists()}))
        elif path.suffix == ".safetensors":
            save_file({"active": self.active.to(torch.uint8)}, str(path))
        else:
            raise ValueError(f"path must end in .json or .safetensors, got {path.name!r}")

    @classmethod
    def load(cls, path: str | Path) -> HeadMask:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"heads file {str(path)!r} does not exist")
        if path.suffix == ".json":
            return cls(torch.tensor(json.loads(path.read_text())["active"], dtype=torch.bool))
        if path.suffix == ".safetensors":
            return cls(load_file(str(path))["active"].bool())
        raise ValueError(f"path must end in .json or .safetensors, got {path.name!r}")


def head_scores(model: nn.Module, batch: Mapping, family: FamilySpec | None = None) -> torch.Tensor:
    """(rows, layers, heads) visual-over-text attention mass of each head on each row of ``batch`` (NaN for a row
    without visual tokens), from one unpatched forward."""
    family = family or family_for(model)
    parts = family.resolve(model)
    input_ids = batch["input_ids"]
    media = family.media_mask(model.config, input_ids)
    padding = batch.get("attention_mask")
    valid = torch.ones_like(media) if padding is None else padding.bool()
    slots = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    scores: dict[int, torch.Tensor] = {}

    def hook(layer_idx, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        probs = query_attention(
            module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), slots, mean_heads=False
        )
        probs = probs * valid.view(valid.shape[0], 1, -1, 1).to(probs.dtype)  # only real query rows
        to_visual = (probs * (media & valid).view(media.shape[0], 1, 1, -1)).sum((-1, -2))
        to_text = (probs * (~media & valid).view(media.shape[0], 1, 1, -1)).sum((-1, -2))
        scores[layer_idx] = to_visual / to_text.clamp_min(torch.finfo(to_text.dtype).tiny)

    handles = [
        getattr(layer, family.attention).register_forward_pre_hook(
            lambda m, a, k, i=i: hook(i, m, a, k), with_kwargs=True
        )
        for i, layer in enumerate(parts.layers)
    ]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stacked = torch.stack([scores[i] for i in range(len(parts.layers))], dim=1)
    has_visual = (media & valid).any(1)
    return stacked.masked_fill(~has_visual.view(-1, 1, 1), float("nan")).cpu()


def score_heads(
    model: nn.Module,
    samples: Mapping | Iterable[Mapping],
    *,
    family: FamilySpec | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """(rows with visual tokens, layers, heads) scores over processor outputs ``samples`` (one forward per batch);
    turn them into masks with :func:`heads_from_scores`, as often as needed."""
    if getattr(model, "_vtexit_engine", None) is not None:
        raise ValueError("calibrate_heads needs the unpatched model; remove the vtexit patch first")
    batches = [samples] if isinstance(samples, Mapping) else list(samples)
    rows = []
    for batch in tqdm(batches, desc="scoring heads", unit="batch", disable=not progress):
        if "input_ids" not in batch:
            raise ValueError("each calibration sample needs input_ids (a processor output)")
        rows.append(head_scores(model, batch, family))
    scores = torch.cat(rows)
    scores = scores[~scores[:, 0, 0].isnan()]
    if len(scores) == 0:
        raise ValueError("samples have no visual tokens: head scores measure attention to them")
    return scores


def heads_from_scores(
    scores: torch.Tensor, *, keep: float | None = 0.5, threshold: float | None = None, vote: float = 0.4
) -> HeadMask:
    """The mask from :func:`score_heads`' scores: ``keep`` (about this share of heads stays active; the threshold is
    its quantile over all rows and heads of layers >= 2) or the public code's absolute ``threshold``; a head stays
    active when its score passes on more than ``vote`` of the rows."""
    _check_settings(keep, threshold, vote)
    deep = scores[:, ALWAYS_ACTIVE_LAYERS:]
    if threshold is None:
        threshold = float(deep.flatten().float().quantile(1.0 - float(keep))) if deep.numel() else 0.0
    active = (scores > threshold).float().mean(0) > vote
    active[:ALWAYS_ACTIVE_LAYERS] = True
    return HeadMask(active)


def _check_settings(keep: float | None, threshold: float | None, vote: float) -> None:
    if threshold is None and (keep is None or isinstance(keep, bool) or not 0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep must be a number in (0, 1] (or give threshold=), got {keep!r}")
    if threshold is not None and not float(threshold) >= 0.0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if not 0.0 <= float(vote) < 1.0:
        raise ValueError(f"vote must be in [0, 1), got {vote!r}")


def calibrate_heads(
    model: nn.Module,
    samples: Mapping | Iterable[Mapping],
    *,
    keep: float | None = 0.5,
    threshold: float | None = None,
    vote: float = 0.4,
    family: FamilySpec | None = None,
    progress: bool = True,
) -> HeadMask:
    """Per-layer masks of the heads active for visual tokens, from processor outputs ``samples``.

    Give ``keep`` (about this share of heads stays active; the score threshold is its quantile over all samples and
    heads of layers >= 2) or ``threshold`` (the public code's absolute threshold). A head stays active when its
    score passes on more than ``vote`` of the rows with visual tokens.
    """
    _check_settings(keep, threshold, vote)  # before the slow scoring
    scores = score_heads(model, samples, family=family, progress=progress)
    return heads_from_scores(scores, keep=keep, threshold=threshold, vote=vote)
