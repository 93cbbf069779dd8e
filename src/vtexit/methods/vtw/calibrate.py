"""VTW's calibration of the withdrawal layer K from the KL divergence, cheaply.

The VTW rule (arXiv 2405.05803): K is the first layer where the mean KL(full model's next-token distribution ||
withdrawn model's) over a small calibration set is at most a threshold eta. Computing it naively costs one full
forward per candidate K. Here each batch runs the full model once, recording every decoder layer's input; each K
then replays only layers K..N-1 on the text positions, through the model's own final norm and head.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vtexit.core.engine import ScheduleEngine
from vtexit.core.families import FamilySpec, family_for
from vtexit.core.guards import has_media_inputs
from vtexit.methods.vtw.config import check_layer, valid_layer_range

# Our choice, from the default model's KL-against-accuracy curve (docs/methods/vtw.md); the paper tunes eta per model.
DEFAULT_ETA = 0.05


@dataclass
class CalibrationResult:
    """The chosen K and the whole KL curve (mean over the rows that have visual tokens, at their last prompt token).

    Rows without visual tokens are left out: withdrawal cannot change them, so their KL of 0 would only pull K
    earlier. ``num_rows`` counts the rows averaged, ``kl_per_row`` lists their values.
    """

    layer: int
    eta: float
    kl: dict[int, float]
    num_rows: int
    num_layers: int
    kl_per_row: dict[int, list[float]] = field(default_factory=dict, repr=False)

    def to_json(self, path: str | Path) -> None:
        data = asdict(self)
        data["kl"] = {str(k): v for k, v in self.kl.items()}
        data["kl_per_row"] = {str(k): v for k, v in self.kl_per_row.items()}
        Path(path).write_text(json.dumps(data, indent=2))


def _is_real_scalar(value: object) -> bool:
    """A real number: int/float/Fraction, a numpy integer or float scalar, or a 0-d integer/float array or tensor."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_eta(eta: object) -> float:
    """``eta`` as a float, or a ValueError naming it: any finite real number >= 0."""
    if not _is_real_scalar(eta):
        raise ValueError(f"eta must be a real number (the KL threshold, e.g. 0.05), got {eta!r}")
    value = float(eta.item() if isinstance(eta, (torch.Tensor, np.ndarray)) else eta)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eta must be a finite number >= 0 (the KL threshold, e.g. 0.05), got {eta!r}")
    return value


def _batches(samples: Mapping | Iterable[Mapping]) -> list[Mapping]:
    if isinstance(samples, Mapping):
        return [samples]
    batches = list(samples)
    if not batches or not all(isinstance(b, Mapping) for b in batches):
        raise ValueError("samples must be a processor output (a dict of tensors) or a non-empty iterable of them")
    return batches


def _last_token_logits(logits: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Logits at each row's last real token (works for left and right padding)."""
    if padding is None:
        return logits[:, -1]
    positions = torch.arange(padding.shape[1], device=padding.device)
    last = (positions * padding.bool()).argmax(dim=1)
    return logits[torch.arange(logits.shape[0]), last]


def _head(model: nn.Module, family_parts, hidden_last: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(family_parts.norm(hidden_last))
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def kl_curve(
    model: nn.Module,
    batch: Mapping,
    layers: list[int],
    *,
    engine: ScheduleEngine,
) -> dict[int, torch.Tensor]:
    """KL(full || withdrawn at K) at the last prompt token of each row that has visual tokens, for each K.

    Rows without visual tokens are skipped (withdrawal leaves them unchanged); a batch with none returns empty
    tensors without running the model.
    """
    input_ids = batch["input_ids"]
    padding = batch.get("attention_mask")
    media = engine.family.media_mask(model.config, input_ids)
    if padding is not None:
        media = media & padding.bool()
    rows = media.any(dim=1).cpu()
    if not rows.any():
        return {k: torch.zeros(0) for k in layers}
    if not has_media_inputs(batch):
        raise ValueError(
            "a calibration sample's input_ids hold visual tokens but it has no pixel inputs (pixel_values or the "
            "like): the model would read them as plain text. Give calibrate the processor's whole output"
        )
    recorded: list[tuple[torch.Tensor, dict]] = []

    def record(module, args, kwargs):
        recorded.append((args[0] if args else kwargs["hidden_states"], dict(kwargs)))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in engine.parts.layers]
    try:
        full = model(**batch, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    full_logp = torch.log_softmax(_last_token_logits(full, padding).float(), dim=-1)
    keep = ~media if padding is None else (~media & padding.bool())
    out: dict[int, torch.Tensor] = {}
    for k in layers:
        if k >= engine.num_layers:
            out[k] = torch.zeros(int(rows.sum()))
            continue
        hidden, _ = engine.replay(recorded, k, keep, padding)
        logp = torch.log_softmax(_head(model, engine.parts, hidden[:, -1]).float(), dim=-1)
        kl = (full_logp.exp() * (full_logp - logp)).sum(-1).clamp_min(0).cpu()
        out[k] = kl[rows]
    return out


def calibrate(
    model: nn.Module,
    samples: Mapping | Iterable[Mapping],
    *,
    eta: float = DEFAULT_ETA,
    layers: Iterable[int] | None = None,
    family: FamilySpec | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Choose VTW's withdrawal layer: the first K whose mean KL over ``samples`` is <= ``eta``.

    ``samples`` are processor outputs (dicts of tensors with ``input_ids``, pixel inputs and ``attention_mask``)
    or an iterable of them. The KL is averaged over the rows that have visual tokens; a set without any is
    refused. The model must not be patched. Returns the chosen K and the KL for every candidate.
    """
    eta = check_eta(eta)
    if getattr(model, "_vtexit_engine", None) is not None:
        raise ValueError("calibrate needs the unpatched model; remove the vtexit patch first")
    family = family or family_for(model)
    low, high = valid_layer_range(model, family)
    candidates = sorted({check_layer(model, k, family) for k in layers}) if layers is not None else None
    candidates = candidates or list(range(low, high + 1))
    if candidates[-1] != high:
        candidates.append(high)
    engine = ScheduleEngine(model, policy=None, family=family)
    batches = _batches(samples)
    per_row: dict[int, list[float]] = {k: [] for k in candidates}
    for batch in tqdm(batches, desc="calibrating K", unit="batch", disable=not progress):
        if "input_ids" not in batch:
            raise ValueError("each calibration sample needs input_ids (a processor output)")
        for k, values in kl_curve(model, batch, candidates, engine=engine).items():
            per_row[k].extend(values.tolist())
    num_rows = len(per_row[high])
    if num_rows == 0:
        raise ValueError(
            "samples have no visual tokens: calibration measures what withdrawing them changes, so give it "
            "processor outputs of prompts with images"
        )
    mean = {k: float(sum(v) / num_rows) for k, v in per_row.items()}
    # K = N (no withdrawal) has KL 0, so some K always qualifies; fall back to it anyway (e.g. NaN logits).
    chosen = next((k for k in candidates if mean[k] <= eta), high)
    return CalibrationResult(
        layer=chosen,
        eta=eta,
        kl=mean,
        num_rows=num_rows,
        num_layers=high,
        kl_per_row=per_row,
    )
