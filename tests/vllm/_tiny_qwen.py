"""A tiny Qwen2.5-VL (or Qwen2-VL) folder that both vLLM and transformers run (with a word-level tokenizer and Qwen's
own image processor), and the reference the Qwen plugin tests compare with: vtexit's transformers path
(``vtexit.apply`` on the same weights, then ``model.generate``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from _tiny_vllm import make_llm  # the engine settings and their environment, shared with the LLaVA tests
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

import vtexit
from vtexit.testing import build_tiny
from vtexit.testing.tiny_folder import make_tokenizer

ARCHITECTURES = {
    "qwen2_5_vl": "VtexitQwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "VtexitQwen2VLForConditionalGeneration",
}
PATCH, MERGE = 4, 2  # the tiny tower: 4 px patches, 2 x 2 of them merged into one language-model token
PROMPT = "user : {images}{question} </s> assistant :"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|> "
# Qwen's names for the tiny vocabulary's media ids (vtexit.testing.vocab: image, video, start, end).
SPECIAL_NAMES = {"<image>": "<|image_pad|>"}


def make_qwen_tokenizer(config) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer of ``vtexit.testing.tiny_folder`` with Qwen's media tokens added at the ids the
    tiny config uses (they sit in the tiny vocabulary's reserved top ids)."""
    base = make_tokenizer()
    vocab = {SPECIAL_NAMES.get(word, word): i for word, i in base.get_vocab().items()}
    names = {
        config.image_token_id: "<|image_pad|>",
        config.video_token_id: "<|video_pad|>",
        config.vision_start_token_id: "<|vision_start|>",
        config.vision_end_token_id: "<|vision_end|>",
    }
    vocab = {word: i for word, i in vocab.items() if i not in names} | {word: i for i, word in names.items()}
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = ["<pad>", "<s>", "</s>", *names.values()]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_qwen_processor(config) -> Qwen2VLProcessor:
    """Qwen2.5-VL's (or Qwen2-VL's) processor for the tiny tower: images keep their size (multiples of 8 px between
    16 x 16 and 64 x 64), 4 px patches, 2 x 2 merged."""
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    common = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, size=size)
    processor = Qwen2_5_VLProcessor if config.model_type == "qwen2_5_vl" else Qwen2VLProcessor
    return processor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common),
        tokenizer=make_qwen_tokenizer(config),
    )


def save_tiny_qwen(folder: Path, family: str = "qwen2_5_vl", seed: int = 0, num_layers: int = 2):
    """Build the tiny Qwen2.5-VL (``family``: or ``"qwen2_vl"``) with what vLLM's CPU backend needs (text head_dim
    32: 2 heads of a 64-wide model, as vLLM's Qwen2 derives it; M-RoPE sections summing to 16), save it with its
    processor. Returns the case (its ``model`` is the transformers reference). transformers 5 saves the keys vLLM's
    Qwen-VL loaders map (``model.visual.*``, ``model.language_model.*``, ``lm_head.*``)."""
    text = {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    }
    case = build_tiny(family, num_layers=num_layers, seed=seed, text_config=text)
    case.model.save_pretrained(folder)
    make_qwen_processor(case.model.config).save_pretrained(folder)
    return case


def image(seed: int, height: int = 32, width: int = 48) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@dataclass
class Request:
    images: list[Image.Image]
    question: str = "what shape is in the image ?"

    @property
    def prompt(self) -> str:
        return PROMPT.format(images=IMAGE * len(self.images), question=self.question)

    def vllm_input(self) -> dict:
        data = {"prompt": self.prompt}
        if self.images:
            data["multi_modal_data"] = {"image": self.images if len(self.images) > 1 else self.images[0]}
        return data


def make_qwen_llm(folder: Path, method: dict, images_per_prompt: int, family: str = "qwen2_5_vl", **kwargs):
    return make_llm(folder, method, images_per_prompt, architecture=ARCHITECTURES[family], **kwargs)


@dataclass
class Reference:
    prompt_ids: list[int]  # the prompt vLLM should run (each image's placeholders: its kept count)
    tokens: list[int]
    logprobs: list[torch.Tensor]  # per generated step, log-softmax of the raw logits (vocab,)


def reference(case, method: dict | None, request: Request, kept: list[int] | None, steps: int) -> Reference:
    """vtexit's transformers path on ``request``: greedy tokens and each step's logprobs (``method`` None: the
    unpatched model). ``kept``: each image's kept token count, for the prompt vLLM should run."""
    processor = make_qwen_processor(case.model.config)
    inputs = processor(text=request.prompt, images=request.images or None, return_tensors="pt")
    model = case.model
    with torch.no_grad(), vtexit.apply(model, method) if method else contextlib.nullcontext():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:].tolist()
    eos = model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    logprobs = [step[0].float().log_softmax(-1) for step in out.logits[: len(tokens)]]
    image_id = model.config.image_token_id
    ids, run, item = [], 0, 0
    for token in inputs["input_ids"][0].tolist():  # each image's run of placeholders shrunk to its kept count
        if token == image_id:
            if kept is None or run < kept[item]:
                ids.append(token)
            run += 1
        else:
            if run:
                run, item = 0, item + 1
            ids.append(token)
    return Reference(ids, tokens, logprobs)


def merged_tokens(request_image: Image.Image) -> tuple[int, int]:
    """(rows, columns) of merged tokens the tiny processor gives an image (its size is kept)."""
    width, height = request_image.size
    return height // (PATCH * MERGE), width // (PATCH * MERGE)
