"""A tiny CLIP-LLaVA folder that both vLLM and transformers run, and the reference each plugin test compares with:
vtexit's transformers path (``vtexit.apply`` on the same weights, then ``model.generate`` / a forward)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vtexit
from vtexit.testing import build_tiny
from vtexit.testing.config_kwargs import vit_kwargs
from vtexit.testing.tiny_folder import make_processor

# What vLLM's CPU backend needs to run offline on a small machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ARCH = "VtexitLlavaForConditionalGeneration"
PROMPT = "user : {images}{question} </s> assistant :"
TOKENS = 6  # greedy tokens per request
LOGPROBS = 20  # per step, vLLM's top ones, compared with the reference's
# float32 on both sides; vLLM's fused projections, its CPU attention kernel and its CLIP differ from transformers'
# SDPA modules by rounding only (about 1e-6 on these logprobs, whose magnitude is about 5). 1e-4 leaves room for
# that and is far below what a wrong token choice or a wrong position moves them (0.01 and more: see each test's
# control against the unpatched model).
ATOL = 1e-4


def save_tiny_llava(folder: Path, seed: int = 0, **overrides):
    """Build the tiny LLaVA (text head_dim 32: vLLM's CPU attention refuses 16), save it with its processor, and
    rename the tower's keys to the layout vLLM's loader reads (transformers 5 saves ``vision_tower.embeddings.*``,
    vLLM wants ``vision_tower.vision_model.*``). Returns the in-memory transformers model (the reference).
    ``overrides``: config kwargs for ``build_tiny``."""
    case = build_tiny("llava", num_layers=2, seed=seed, text_config={"head_dim": 32}, **overrides)
    case.model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    _rename_tower_keys(folder / "model.safetensors")
    return case


def _rename_tower_keys(path: Path) -> None:
    state = load_file(path)
    renamed = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :] if k.startswith("vision_tower.") else k): v
        for k, v in state.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def save_tiny_siglip_llava(folder: Path, seed: int = 0):
    """The tiny LLaVA of :func:`save_tiny_llava` with a SigLIP tower instead of CLIP (same image and patch size:
    16 patches, no CLS token, so ``vision_feature_select_strategy="full"``, as LLaVA models with SigLIP use), saved
    for vLLM (keys under ``vision_tower.vision_model.*``). Returns the case with the SigLIP model."""
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(**{**vit_kwargs(16, 4), "vision_use_head": False})
    case = _save_with_tower(folder, seed, vision, strategy="full")
    _rename_tower_keys(folder / "model.safetensors")
    return case


def save_tiny_dinov2_llava(folder: Path, seed: int = 0):
    """The tiny LLaVA of :func:`save_tiny_llava` with a two-layer DINOv2 tower (16 px images, 4 px patches: a CLS
    token and 16 patches, ``"default"`` strategy) whose first layer the projector reads, as vtexit's default model
    is laid out (the plugin builds the tower from transformers' ``Dinov2Model``; keys as transformers saves them).
    Returns the case with the DINOv2 model."""
    from transformers import Dinov2Config

    vision = Dinov2Config(**{**vit_kwargs(16, 4), "num_hidden_layers": 2})
    return _save_with_tower(folder, seed, vision, strategy="default", vision_feature_layer=-2)


def _save_with_tower(folder: Path, seed: int, vision, strategy: str, **top_overrides):
    """``vtexit.testing`` builds LLaVA with CLIP only: the config is assembled here with ``vision`` as the tower's
    config, the rest as :func:`save_tiny_llava`'s, and saved with its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vtexit.testing.build import instantiate, randomise_zero_inits

    clip = build_tiny("llava", num_layers=2, seed=seed, text_config={"head_dim": 32})
    top = clip.model.config.to_dict()
    for key in ("text_config", "vision_config", "architectures", "model_type", "transformers_version"):
        top.pop(key, None)
    top.update(vision_feature_select_strategy=strategy, **top_overrides)
    config = LlavaConfig(text_config=clip.model.config.text_config, vision_config=vision, **top)
    model = instantiate(LlavaForConditionalGeneration, config, "sdpa", seed)
    randomise_zero_inits(model, seed)
    model.generation_config = clip.model.generation_config
    case = replace(clip, model=model)
    model.save_pretrained(folder)
    processor = make_processor()
    if strategy == "full":
        processor.vision_feature_select_strategy = "full"
        processor.num_additional_image_tokens = 0  # no CLS: still 16 placeholders per image
    processor.save_pretrained(folder)
    return case


def images(count: int, seed: int, size: int = 16) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@dataclass
class Request:
    images: list[Image.Image]
    question: str = "what shape is in the image ?"

    @property
    def prompt(self) -> str:
        return PROMPT.format(images="<image> " * len(self.images), question=self.question)

    def vllm_input(self) -> dict:
        data = {"prompt": self.prompt}
        if self.images:
            data["multi_modal_data"] = {"image": self.images if len(self.images) > 1 else self.images[0]}
        return data


def make_llm(folder: Path, method: dict, images_per_prompt: int, architecture: str = ARCH, **kwargs):
    """A small float32 eager engine on the model in ``folder`` under the plugin's ``architecture`` and ``method``;
    ``kwargs`` override the engine settings."""
    from vllm import LLM

    settings = dict(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        limit_mm_per_prompt={"image": images_per_prompt},
        hf_overrides={"architectures": [architecture], "vtexit": method},
    )
    return LLM(**{**settings, **kwargs})


def allowed_ids(case) -> list[int]:
    """Every id transformers' generate may pick (the tiny model's generation config suppresses the media and
    special ids but EOS), for vLLM's ``allowed_token_ids``: the same greedy rule on both sides."""
    suppressed = set(case.model.generation_config.suppress_tokens or ())
    return [i for i in range(case.model.config.text_config.vocab_size) if i not in suppressed]


def sampling(case):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=TOKENS, logprobs=LOGPROBS, allowed_token_ids=allowed_ids(case))


@dataclass
class Reference:
    prompt_ids: list[int]  # the prompt the language model sees (each image's placeholders: its kept count)
    tokens: list[int]
    logprobs: list[torch.Tensor]  # per generated step, log-softmax of the raw logits (vocab,)


def reference(case, method: dict | None, request: Request, kept: int | None) -> Reference:
    """vtexit's transformers path on ``request``: greedy tokens and every step's logprobs (``method`` None: the
    unpatched model). ``kept``: each image's kept token count, for the expected vLLM prompt."""
    processor = make_processor()
    inputs = processor(text=request.prompt, images=request.images or None, return_tensors="pt")
    model = case.model
    with torch.no_grad(), vtexit.apply(model, method) if method else contextlib.nullcontext():
        out = model.generate(
            **inputs,
            max_new_tokens=TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:].tolist()
    if case.model.generation_config.eos_token_id in tokens:
        tokens = tokens[: tokens.index(case.model.generation_config.eos_token_id) + 1]
    logprobs = [step[0].float().log_softmax(-1) for step in out.logits[: len(tokens)]]
    image_id = case.image_token_id
    ids, run = [], 0
    for token in inputs["input_ids"][0].tolist():  # each image's run of placeholders shrunk to the kept count
        if token == image_id:
            run += 1
            if kept is None or run <= kept:
                ids.append(token)
            if run == 16:
                run = 0
        else:
            ids.append(token)
    return Reference(ids, tokens, logprobs)


def compare(output, ref: Reference) -> float:
    """Assert vLLM's ``output`` (a RequestOutput) equals the reference: the prompt it ran, the greedy tokens, and
    every step's top logprobs within ATOL. Returns the largest logprob difference."""
    assert list(output.prompt_token_ids) == ref.prompt_ids
    completion = output.outputs[0]
    assert list(completion.token_ids) == ref.tokens
    worst = 0.0
    for step, (top, expected) in enumerate(zip(completion.logprobs, ref.logprobs, strict=True)):
        for token, logprob in top.items():
            diff = abs(logprob.logprob - float(expected[token]))
            worst = max(worst, diff)
            assert diff <= ATOL, f"step {step}, token {token}: vLLM {logprob.logprob}, vtexit {float(expected[token])}"
    return worst


def first_step_gap(output, ref: Reference) -> float:
    """The largest first-step difference between vLLM's top logprobs and another reference (for controls)."""
    top = output.outputs[0].logprobs[0]
    return max(abs(lp.logprob - float(ref.logprobs[0][token])) for token, lp in top.items())


def record_steps(llm) -> None:
    """Have the engine's model note, for every step, each request row's (context before the step, first KV block,
    visual flags of its rows): what the VTW stress tests assert happened. Observes only; the plan is VTW's own."""

    def install(model) -> None:
        withdrawal = model.vtexit_withdrawal
        withdrawal.steps, plan = [], withdrawal.plan

        def recording(context, mask, positions, dtype):
            metadata = context.attn_metadata[next(iter(withdrawal.attention))]
            starts, seq_lens = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
            blocks = metadata.block_table[:, 0].tolist()
            flags = mask.tolist() if mask is not None else [False] * starts[-1]
            withdrawal.steps.append(
                [
                    (seq_lens[r] - (starts[r + 1] - starts[r]), blocks[r], flags[starts[r] : starts[r + 1]])
                    for r in range(len(seq_lens))
                ]
            )
            return plan(context, mask, positions, dtype)

        withdrawal.plan = recording

    llm.apply_model(install)


def recorded_steps(llm) -> list:
    """What :func:`record_steps` noted so far."""
    return llm.apply_model(lambda model: model.vtexit_withdrawal.steps)[0]
