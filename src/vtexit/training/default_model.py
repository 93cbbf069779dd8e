"""Tune the default model (mini-LLaVA) on easy-vqa train with a method active: the data of its own training
(``vtexit.default_model.training_data``: one image, 1..turns question/answer turns, answer-only labels), pixels
preprocessed once and cached, then :func:`vtexit.training.tune`."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from vtexit.training.lora import LoraSettings, save_lora
from vtexit.training.sampler import ConfigSampler
from vtexit.training.tune import TuneResult, tune


def _pixels(processor, paths: list[Path], cache: Path) -> torch.Tensor:
    """Preprocessed pixels of every training image (the vision tower stays frozen; it runs in each step)."""
    if cache.is_file():
        saved = torch.load(cache)
        if saved["paths"] == [str(p) for p in paths]:
            return saved["pixels"]
    out = []
    for start in range(0, len(paths), 64):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + 64]]
        out.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    pixels = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"paths": [str(p) for p in paths], "pixels": pixels}, cache)
    return pixels


def easy_vqa_batches(processor, *, images: int, turns: int, batch: int, seed: int, work_dir: Path) -> Iterator[dict]:
    """Endless seeded batches of model inputs with answer-only labels, right-padded."""
    from vtexit.default_model.training_data import Batches, Encoder, collate, group_by_image
    from vtexit.evaluation.datasets.easy_vqa import EasyVQA

    train = EasyVQA("train")
    image_ids = sorted({r.image_id for r in train})
    random.Random(seed).shuffle(image_ids)
    chosen = sorted(image_ids[:images])
    keep = set(chosen)
    groups = group_by_image([r for r in train if r.image_id in keep])
    row_of = {image_id: row for row, image_id in enumerate(chosen)}
    pixels = _pixels(processor, [train.image_path(i) for i in chosen], work_dir / f"pixels_{seed}_{images}.pt")
    encoder = Encoder(processor.tokenizer)
    sampler = Batches(groups, row_of, turns, seed)
    while True:
        rows, convs = sampler.next(batch)
        ids, labels, mask = collate([encoder.encode(c) for c in convs], processor.tokenizer.pad_token_id)
        yield {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[rows], "labels": labels}


def tune_default_model(
    sampler: ConfigSampler,
    *,
    steps: int,
    out: Path,
    lr: float = 3e-4,
    seed: int = 0,
    lora: LoraSettings | None = None,
    images: int = 2000,
    turns: int = 5,
    batch: int = 8,
    bf16: bool = True,
    work_dir: Path = Path("out/tune"),
    progress: bool = True,
    info: dict[str, str] | None = None,
) -> TuneResult:
    """Tune the shipped default model (``load_default()``) and save the new LoRA factors (float16) at ``out``."""
    from vtexit.default_model import load_default

    model, processor = load_default()
    batches = easy_vqa_batches(processor, images=images, turns=turns, batch=batch, seed=seed, work_dir=work_dir)
    lora = lora or LoraSettings()
    start = time.time()
    result = tune(
        model, batches, sampler, steps=steps, lr=lr, seed=seed, lora=lora, bf16=bf16,
        log=work_dir / "loss_log.jsonl", progress=progress,
    )  # fmt: skip
    record = {
        "seed": str(seed), "steps": str(steps), "lr": repr(lr), "batch": str(batch), "turns": str(turns),
        "train_images": str(images), "lora_r": str(lora.r), "lora_alpha": repr(lora.alpha), "bf16": str(bf16),
        "sampler": json.dumps([None if c is None else c.to_dict() for c in sampler.choices]),
        "weights": json.dumps(list(sampler.weights) if sampler.weights else None),
        "storage": "float16", **(info or {}),
    }  # fmt: skip
    save_lora(model, out, record)
    summary = {"seconds": round(time.time() - start, 1), "tune_seconds": round(result.seconds, 1), **record}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
