"""Training data for DyVTE's gates, from the model itself: one recorded forward per batch labels every layer.

For each batch the prompt is followed by its answer (the full model's own greedy answer by default, or the answer
the caller gives) and the model runs once, unpatched, recording every decoder layer's input (calibration's
record-and-replay, :meth:`~vtexit.core.engine.ScheduleEngine.replay`). Then, for each candidate exit layer K, only
layers K..N-1 are replayed on the text positions, teacher-forcing the answer. Exiting before layer K is *safe* for a
row when its answer tokens keep the full run's top-1 (at least ``min_agreement`` of them) and its answer loss stays
at most ``loss_ratio`` x the full run's (DyVTE's rule: 0.99 agreement, 1.03 x loss). The gate features of every
layer come from the same recorded forward, at the prompt's positions (causal attention: the answer does not change
them), so no extra forward is needed. The public code instead draws one random layer per training step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vtexit.core.engine import ScheduleEngine
from vtexit.core.layout import Layout
from vtexit.methods.dyvte.features import feature_slots, gate_features
from vtexit.methods.vtw.calibrate import _head

ANSWER_KEY = "answer_ids"  # optional batch entry: a list (one per row) of 1D answer token ids to teacher-force
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")  # per-token inputs that grow with the sequence


@dataclass(frozen=True)
class LabelRule:
    """When exiting at a layer is safe: top-1 agreement with the full run on the answer tokens >= ``min_agreement``
    and answer loss <= ``loss_ratio`` x the full run's."""

    min_agreement: float = 1.0
    loss_ratio: float = 1.03

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement!r}")
        if not self.loss_ratio >= 1.0:
            raise ValueError(f"loss_ratio must be >= 1 (exited loss / full loss), got {self.loss_ratio!r}")

    def safe(self, agreement: torch.Tensor, loss_ratio: torch.Tensor) -> torch.Tensor:
        return (agreement >= self.min_agreement - 1e-6) & (loss_ratio <= self.loss_ratio)


DEFAULT_RULE = LabelRule()


@dataclass
class ExitLabels:
    """Per row with visual tokens and per candidate exit layer: gate features and whether exiting there is safe."""

    layers: tuple[int, ...]
    num_layers: int
    features: torch.Tensor  # (rows, len(layers), 2 * hidden) float32, on the CPU
    agreement: torch.Tensor  # (rows, len(layers)) share of answer tokens whose top-1 is the full run's
    loss_ratio: torch.Tensor  # (rows, len(layers)) answer loss when exiting / full answer loss
    full_loss: torch.Tensor  # (rows,) the full run's mean answer loss
    rule: LabelRule = DEFAULT_RULE

    @property
    def rows(self) -> int:
        return self.features.shape[0]

    @property
    def safe(self) -> torch.Tensor:
        """(rows, len(layers)) bool: exiting before the layer is safe under ``rule``."""
        return self.rule.safe(self.agreement, self.loss_ratio)

    def with_rule(self, rule: LabelRule) -> ExitLabels:
        """The same records labelled by another rule (no forward needed)."""
        return dataclasses.replace(self, rule=rule)

    def select(self, rows: torch.Tensor) -> ExitLabels:
        """Some rows only (an index or a bool mask)."""
        return dataclasses.replace(
            self, **{name: getattr(self, name)[rows] for name in ("features", "agreement", "loss_ratio", "full_loss")}
        )

    @classmethod
    def concat(cls, parts: Sequence[ExitLabels]) -> ExitLabels:
        names = ("features", "agreement", "loss_ratio", "full_loss")
        return dataclasses.replace(parts[0], **{name: torch.cat([getattr(p, name) for p in parts]) for name in names})

    def save(self, path: str | os.PathLike[str]) -> None:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["rule"] = dataclasses.asdict(self.rule)
        torch.save(data, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitLabels:
        data = torch.load(path, weights_only=True)
        data["rule"] = LabelRule(**data["rule"])
        data["layers"] = tuple(data["layers"])
        return cls(**data)

    def earliest_safe(self) -> torch.Tensor:
        """(rows,) the first candidate layer where exiting is safe (N if none): the best a perfect gate could do."""
        layers = torch.tensor([*self.layers, self.num_layers])
        safe = torch.cat([self.safe, torch.ones(self.rows, 1, dtype=torch.bool)], dim=1)
        return layers[safe.to(torch.int8).argmax(dim=1)]


def greedy_answers(model: nn.Module, inputs: Mapping, media_ids: list[int], max_new_tokens: int) -> list[torch.Tensor]:
    """The model's own greedy answer per row, cut after its first end-of-sequence token."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (min(eos) if eos else 0)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        do_sample=False,
        suppress_tokens=media_ids or None,
        pad_token_id=pad,
    )
    answers = []
    for row in out[:, inputs["input_ids"].shape[1] :].cpu():
        ends = [i for i, token in enumerate(row.tolist()) if token in eos]
        answers.append(row[: ends[0] + 1] if ends else row)
    return answers


def _with_answers(inputs: Mapping, answers: list[torch.Tensor], pad_id: int) -> tuple[dict, torch.Tensor]:
    """The batch with each row's answer appended (then right padding), and the answer lengths."""
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    lengths = torch.tensor([len(a) for a in answers], device=input_ids.device)
    width = int(lengths.max())
    block = torch.full((batch, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for b, answer in enumerate(answers):
        block[b, : len(answer)] = answer.to(input_ids.device)
    columns = torch.arange(width, device=input_ids.device)
    full = dict(inputs)
    full["input_ids"] = torch.cat([input_ids, block], dim=1)
    padding = inputs.get("attention_mask")
    padding = torch.ones_like(input_ids) if padding is None else padding
    full["attention_mask"] = torch.cat([padding, (columns < lengths.unsqueeze(1)).to(padding.dtype)], dim=1)
    for key in set(TOKEN_TYPE_KEYS) & full.keys():  # answer tokens are text (type 0)
        full[key] = torch.cat([full[key], torch.zeros_like(block)], dim=1)
    return full, lengths


def _record(model: nn.Module, engine: ScheduleEngine, inputs: dict) -> tuple[list, torch.Tensor]:
    """Every decoder layer's input (hidden states, kwargs) and the last layer's output, in one unpatched forward."""
    recorded: list[tuple[torch.Tensor, dict]] = []
    output: list[torch.Tensor] = []

    def record(module, args, kwargs):
        recorded.append((args[0] if args else kwargs["hidden_states"], dict(kwargs)))

    def last(module, args, out):
        output.append(out[0] if isinstance(out, tuple) else out)

    layers = engine.parts.layers
    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(last))
    try:
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return recorded, output[0]


def _answer_stats(logits: torch.Tensor, targets: torch.Tensor, full_top1: torch.Tensor, rows: torch.Tensor, batch: int):
    """Per row: share of positions whose top-1 equals ``full_top1``, and mean loss of ``targets``."""
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    agree = (logp.argmax(dim=-1) == full_top1).float()
    count = torch.zeros(batch, device=logits.device).index_add_(0, rows, torch.ones_like(nll))
    loss = torch.zeros(batch, device=logits.device).index_add_(0, rows, nll) / count
    agreement = torch.zeros(batch, device=logits.device).index_add_(0, rows, agree) / count
    return agreement, loss, logp.argmax(dim=-1)


@torch.no_grad()
def label_batch(
    model: nn.Module,
    batch: Mapping,
    layers: Sequence[int],
    *,
    engine: ScheduleEngine,
    rule: LabelRule = DEFAULT_RULE,
    max_new_tokens: int = 4,
) -> ExitLabels:
    """Features and exit labels for every row of ``batch`` that has visual tokens, at every layer of ``layers``.

    ``batch`` is a left-padded processor output; an optional ``answer_ids`` entry (one 1D tensor per row) gives
    the answers to teacher-force, otherwise the model's greedy answer (up to ``max_new_tokens``) is used.
    """
    inputs = {k: v for k, v in batch.items() if k != ANSWER_KEY}
    input_ids = inputs["input_ids"]
    batch_size, prompt_length = input_ids.shape
    padding = inputs.get("attention_mask")
    padding = torch.ones_like(input_ids, dtype=torch.bool) if padding is None else padding.bool()
    if not bool(padding[:, -1].all()):
        raise ValueError("samples must be left-padded (every row's prompt ends in the last column)")
    media = engine.family.media_mask(model.config, input_ids) & padding
    media_ids = engine.family.media_token_ids(model.config)
    answers = batch.get(ANSWER_KEY)
    if answers is None:
        answers = greedy_answers(model, inputs, media_ids, max_new_tokens)
    elif len(answers) != batch_size or any(len(a) == 0 for a in answers):
        raise ValueError(f"{ANSWER_KEY} must hold one non-empty answer per row ({batch_size} rows)")
    pad_id = model.generation_config.pad_token_id or 0
    full, lengths = _with_answers(inputs, answers, pad_id)
    full_valid = full["attention_mask"].bool()
    recorded, last_output = _record(model, engine, full)

    # Position p predicts token p + 1: the answer is predicted from the last prompt token on.
    total = full["input_ids"].shape[1]
    next_ids = torch.cat([full["input_ids"][:, 1:], full["input_ids"][:, :1]], dim=1)
    start = prompt_length - 1

    def scored(index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return valid & (index >= start) & (index < start + lengths.unsqueeze(1))

    positions = torch.arange(total, device=input_ids.device).expand(batch_size, total)
    where = scored(positions, full_valid)
    rows = where.nonzero()[:, 0]
    targets = next_ids[where]
    full_logits = _head(model, engine.parts, last_output[where])
    _, full_loss, full_top1 = _answer_stats(full_logits, targets, targets, rows, batch_size)

    media_full = torch.cat([media, torch.zeros_like(full_valid[:, prompt_length:])], dim=1)
    keep = full_valid & ~media_full
    prompt_layout = Layout.full(padding, batch_size, prompt_length, input_ids.device)
    after, last = feature_slots(media, prompt_layout)
    features, agreement, loss = [], [], []
    for k in layers:
        features.append(gate_features(recorded[k][0][:, :prompt_length], after, last).float())
        hidden, layout = engine.replay(recorded, k, keep, full["attention_mask"])
        slots = scored(layout.index, layout.valid)
        exited = _head(model, engine.parts, hidden[slots])
        agree, row_loss, _ = _answer_stats(exited, next_ids.gather(1, layout.index)[slots], full_top1, rows, batch_size)
        agreement.append(agree)
        loss.append(row_loss)
    with_media = media.any(dim=1)
    agreement = torch.stack(agreement, dim=1)[with_media].cpu()
    ratio = (torch.stack(loss, dim=1) / full_loss.unsqueeze(1).clamp_min(1e-12))[with_media].cpu()
    return ExitLabels(
        layers=tuple(layers),
        num_layers=engine.num_layers,
        features=torch.stack(features, dim=1)[with_media].cpu(),
        agreement=agreement,
        loss_ratio=ratio,
        full_loss=full_loss[with_media].cpu(),
        rule=rule,
    )
