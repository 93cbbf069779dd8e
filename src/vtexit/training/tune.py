"""The tuning loop: LoRA on the language model, each step under a method config drawn by a sampler.

Each step patches the model with the drawn config (``vtexit.apply``), runs it with ``labels`` so the engine scores
the kept answer positions (``vtexit.core.loss``), removes the patch, and steps the optimizer on the LoRA factors
only. A step that draws ``None`` runs the plain model (transformers' own loss; the same rule without a drop).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vtexit.core.families import FamilySpec, family_for
from vtexit.methods.base import MethodConfig
from vtexit.methods.patch import apply
from vtexit.training.lora import DEFAULT_LORA, LoraSettings, add_lora, base_model, has_lora, lora_parameters

Batch = Mapping[str, torch.Tensor]
Sampler = Callable[[torch.Generator], MethodConfig | None]


@dataclass
class TuneResult:
    """What ran: per step the loss and the method config (as a dict; None = plain model), and wall time."""

    losses: list[float] = field(default_factory=list)
    configs: list[dict | None] = field(default_factory=list)
    seconds: float = 0.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (the default model's training schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def step_loss(model: nn.Module, batch: Batch, config: MethodConfig | None, family: FamilySpec | None = None):
    """Loss of one batch (which holds ``labels``) with ``config`` active; the patch is removed before returning."""
    if "labels" not in batch:
        raise ValueError("each batch must hold labels (-100 where no loss is taken, e.g. everything but answers)")
    if config is None:
        return model(**batch).loss
    target = base_model(model)
    with apply(target, config, family=family or family_for(target)):
        return model(**batch).loss


def trainable_lora(model: nn.Module, lora: LoraSettings | None, family: FamilySpec | None = None) -> list:
    """Add LoRA (unless ``lora`` is None: use the model's own) and freeze everything but the LoRA factors."""
    if lora is not None:
        if has_lora(model):
            raise ValueError("model already has LoRA layers; pass lora=None to train them instead of adding new ones")
        add_lora(model, lora, family)
    elif not has_lora(model):
        raise ValueError("lora=None needs a model with LoRA layers (peft); pass LoraSettings to add them")
    model.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def _check(steps: int, lr: float, warmup: float, clip: float | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction of steps in [0, 1), got {warmup!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")


def tune(
    model: nn.Module,
    batches: Iterable[Batch],
    sampler: Sampler,
    *,
    steps: int,
    lr: float = 3e-4,
    seed: int = 0,
    lora: LoraSettings | None = DEFAULT_LORA,
    warmup: float = 0.1,
    clip: float | None = 1.0,
    bf16: bool = False,
    log: str | Path | None = None,
    progress: bool = True,
    family: FamilySpec | None = None,
) -> TuneResult:
    """Fine-tune ``model`` in place so that it works with the sampled method active.

    ``batches`` yields model inputs with ``labels`` (``steps`` of them are used); ``sampler(generator)`` returns
    the config of each step (``vtw_sampler`` draws K per step). New LoRA factors (``lora``) are added to the
    language model unless the model already has LoRA layers (``lora=None``: train those). Everything else is
    frozen. ``seed`` fixes the LoRA init and the sampler; ``log`` gets one JSON line per step.
    """
    _check(steps, lr, warmup, clip)
    if not callable(sampler):
        raise ValueError(f"sampler must be callable(generator) -> MethodConfig | None, got {type(sampler).__name__}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = trainable_lora(model, lora, family)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_steps = max(1, int(steps * warmup))
    log_file = None
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        log_file = Path(log).open("w")
    result = TuneResult()
    iterator: Iterator[Batch] = iter(batches)
    steps_range: Iterable[int] = range(steps)
    if progress:
        from tqdm import tqdm

        steps_range = tqdm(steps_range, desc="tune", total=steps)
    start = time.time()
    try:
        for step in steps_range:
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, steps, warmup_steps)
            batch = next(iterator)
            config = sampler(generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = step_loss(model, batch, config, family)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.configs.append(None if config is None else config.to_dict())
            if progress:
                steps_range.set_postfix(loss=f"{value:.3f}", method=_short(config))
            if log_file is not None:
                event = {"step": step, "loss": round(value, 5), "config": result.configs[-1]}
                event["seconds"] = round(time.time() - start, 2)
                log_file.write(json.dumps(event) + "\n")
                log_file.flush()
    finally:
        if log_file is not None:
            log_file.close()
        optimizer.zero_grad(set_to_none=True)
    result.seconds = time.time() - start
    return result


def _short(config: MethodConfig | None) -> str:
    if config is None:
        return "none"
    settings = {k: v for k, v in config.to_dict().items() if k != "method"}
    return f"{config.method}:" + ",".join(f"{k}={v}" for k, v in settings.items())
