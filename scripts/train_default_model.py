"""Train the default model's projector (stage 1) and projector + LM LoRA (stage 2) on easy-vqa.

The LLaVA recipe, sized for one CPU thread:
  * vision features of the training images are computed once (DINOv2 is frozen) and cached on disk;
  * each sequence holds one image and ``--turns`` question/answer turns about it (LLaVA trains on multi-turn
    conversations too); the first turn is exactly the inference prompt of ``vtexit.default_model.build_prompt``;
  * the loss is on answer tokens only, and the LM head runs only at those positions.
At the end the small weights are written to ``src/vtexit/models/weights/`` and the model is reloaded the way
``load_default()`` does and scored on a fixed subset of the easy-vqa test split.

    python scripts/train_default_model.py --stage1-steps 60 --stage2-steps 250
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vtexit.default_model import load_default
from vtexit.default_model.adapter import ADAPTER_FILE, apply_adapter, peft_lora_factors, save_adapter
from vtexit.default_model.prompt import build_prompt
from vtexit.default_model.training_data import Batches, Encoder, collate, group_by_image
from vtexit.evaluation.datasets.easy_vqa import EasyVQA
from vtexit.evaluation.datasets.select import fixed_subset
from vtexit.evaluation.evaluate import evaluate as evaluate_vqa

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=1500, help="train-split images used (random subset)")
    p.add_argument("--turns", type=int, default=4, help="max question/answer turns per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences (images) per step")
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=250)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=5e-4, help="LoRA lr (projector uses a third of it)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=600, help="fixed test-split subset size")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path("out/train_default_model"))
    p.add_argument("--out", type=Path, default=ADAPTER_FILE)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training forward/backward")
    p.add_argument("--eval-only", action="store_true", help="only score the weights at --out")
    p.add_argument("--measure", type=int, default=0, help="only time this many steps of each stage, then exit")
    return p.parse_args()


class Log:
    """Appends one JSON line per event to the loss log (and keeps a copy for the record)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")

    def __call__(self, **event) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()


@torch.no_grad()
def vision_features(model, processor, paths: list[Path], cache: Path, batch: int = 32) -> torch.Tensor:
    """Frozen DINOv2 features exactly as LLaVA selects them (last layer, CLS dropped): [N, 64, 384]."""
    if cache.is_file():
        saved = torch.load(cache)
        if saved["paths"] == [str(p) for p in paths]:
            return saved["features"]
    layer = model.config.vision_feature_layer
    out = []
    for start in tqdm(range(0, len(paths), batch), desc="vision features"):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
        out.append(hidden[:, 1:].contiguous())
    features = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"paths": [str(p) for p in paths], "features": features}, cache)
    return features


def answer_loss(model, features: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Cross-entropy on answer tokens, with the LM head applied only where a label is predicted."""
    core = model.model
    embeds = core.language_model.get_input_embeddings()(ids)
    image_embeds = core.multi_modal_projector(features).to(embeds.dtype)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, image_embeds)
    hidden = core.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where])


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run_stage(name, model, params, steps, lr_groups, batches, encoder, features, args, log) -> float:
    """Train ``params`` for ``steps`` steps; returns wall time in seconds."""
    optimizer = torch.optim.AdamW(lr_groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, steps // 10)
    pad_id = encoder.tok.pad_token_id
    start = time.time()
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor(step, steps, warmup)
        rows, convs = batches.next(args.batch)
        ids, labels, mask = collate([encoder.encode(c) for c in convs], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = answer_loss(model, features[rows], ids, labels, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        elapsed = round(time.time() - start, 2)
        log(stage=name, step=step, loss=round(loss.item(), 5), tokens=int(mask.sum()), seconds=elapsed)
    return time.time() - start


def evaluate(adapter: Path, size: int, seed: int) -> tuple[dict, float]:
    """Score saved weights on a fixed test subset, building the model exactly as ``load_default()`` does."""
    model, processor = load_default(trained=False)
    apply_adapter(model, adapter)
    records = fixed_subset(EasyVQA("test"), size, seed)
    start = time.time()
    result = evaluate_vqa(model, processor, records, build_prompt, batch_size=16, name="eval")
    scores = {k: {"accuracy": v, "n": result.count_per_type[k]} for k, v in result.per_type.items()}
    scores["overall"] = {"accuracy": result.accuracy, "n": result.n}
    return dict(sorted(scores.items())), time.time() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.eval_only:
        result, seconds = evaluate(args.out, args.eval_size, args.eval_seed)
        summary = {"adapter": str(args.out), "eval": result, "eval_seed": args.eval_seed, "eval_seconds": seconds}
        args.work_dir.mkdir(parents=True, exist_ok=True)
        (args.work_dir / "eval_only.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        return
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()
    log = Log(args.work_dir / "loss_log.jsonl")

    model, processor = load_default(trained=False)
    model.requires_grad_(False)
    encoder = Encoder(processor.tokenizer)
    check = processor(images=Image.new("RGB", (64, 64)), text=build_prompt("is there a red shape?"))
    assert check["input_ids"][0] == encoder.prompt_ids("is there a red shape?"), "training ids differ from processor"

    train = EasyVQA("train")
    image_ids = sorted({r.image_id for r in train})
    random.Random(args.seed).shuffle(image_ids)
    chosen = sorted(image_ids[: args.train_images])
    keep = set(chosen)
    groups = group_by_image([r for r in train if r.image_id in keep])
    row_of = {image_id: row for row, image_id in enumerate(chosen)}
    tf = time.time()
    features = vision_features(
        model, processor, [train.image_path(i) for i in chosen], args.work_dir / f"features_{args.seed}.pt"
    )
    feature_seconds = time.time() - tf
    n_questions = sum(len(v) for v in groups.values())
    print(f"{len(chosen)} images, {n_questions} questions, features {tuple(features.shape)} in {feature_seconds:.0f}s")
    batches = Batches(groups, row_of, args.turns, args.seed)

    projector = list(model.model.multi_modal_projector.parameters())
    for p in projector:
        p.requires_grad_(True)
    model.train()
    s1_steps = args.measure or args.stage1_steps
    s1 = run_stage(
        "stage1",
        model,
        projector,
        s1_steps,
        [{"params": projector, "lr": args.stage1_lr}],
        batches,
        encoder,
        features,
        args,
        log,
    )

    from peft import LoraConfig, inject_adapter_in_model

    lm = model.model.language_model
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    inject_adapter_in_model(config, lm)
    lora_params = [p for n, p in lm.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    s2_steps = args.measure or args.stage2_steps
    groups2 = [{"params": lora_params, "lr": args.stage2_lr}, {"params": projector, "lr": args.stage2_lr / 3}]
    s2 = run_stage("stage2", model, projector + lora_params, s2_steps, groups2, batches, encoder, features, args, log)
    if args.measure:
        print(f"measure: stage1 {s1 / s1_steps:.2f} s/step, stage2 {s2 / s2_steps:.2f} s/step")
        return

    factors, scale = peft_lora_factors(lm)
    projector_state = {k: v for k, v in model.model.multi_modal_projector.state_dict().items()}
    info = {
        "seed": str(args.seed),
        "stage1_steps": str(s1_steps),
        "stage2_steps": str(s2_steps),
        "batch": str(args.batch),
        "turns": str(args.turns),
        "train_images": str(args.train_images),
        "storage": "float16",
    }
    save_adapter(args.out, projector_state, factors, scale, info)
    train_seconds = time.time() - t0
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); training wall time {train_seconds:.0f}s")

    del model
    result, eval_seconds = evaluate(args.out, args.eval_size, args.eval_seed)
    summary = {
        "train_seconds": round(train_seconds, 1),
        "feature_seconds": round(feature_seconds, 1),
        "stage1_seconds": round(s1, 1),
        "stage2_seconds": round(s2, 1),
        "eval_seconds": round(eval_seconds, 1),
        "train_images": len(chosen),
        "train_questions_available": n_questions,
        "eval": result,
        "eval_seed": args.eval_seed,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    log(summary=summary)
    (args.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
