"""A tiny random LLaVA saved as a model folder *with* a real processor, built offline.

The tiny models of :mod:`vtexit.testing.tiny_models` have no tokenizer, but anything that loads a folder the way a
user does (``AutoProcessor`` + ``AutoModelForImageTextToText``: the CLI, the lmms-eval plugin) needs one. This
writes the tiny LLaVA beside a ``LlavaProcessor`` made of a word-level tokenizer (every text id of the tiny
vocabulary is a distinct lowercase word, so generated answers are words and first-word matching means something)
and a PIL image processor giving the tiny CLIP tower's 16 patches. Nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from vtexit.testing.build import build_tiny
from vtexit.testing.vocab import BOS_ID, EOS_ID, PAD_ID, TINY_VOCAB_SIZE, Vocab

__all__ = ["IMAGE_SIZE", "IMAGE_TOKEN", "WORDS", "make_processor", "save_tiny_llava_folder", "write_shape_questions"]

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 16  # the tiny CLIP tower: 16 px, 4 px patches -> 16 image tokens (CLS dropped)
PATCH_SIZE = 4
# Words of easy-vqa-style questions and answers and of the chat template get the first text ids; every other
# text id is a made-up word (``zab``, ``zac``, ...), so decoded generations are words.
WORDS = (
    "user assistant : what shape is in the image does contain a an color of circle rectangle triangle "
    "red green blue black gray yellow teal brown yes no there not ? ."
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ' :' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ ' <image>' }}{% else %}{{ ' ' + item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}"
)


def _filler(i: int) -> str:
    letters = string.ascii_lowercase
    return "z" + letters[i // 26 % 26] + letters[i % 26]


def _vocab() -> dict[str, int]:
    vocab = Vocab(TINY_VOCAB_SIZE)
    low, high = vocab.text_range
    names = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", vocab.image: IMAGE_TOKEN, low: "<unk>"}
    names.update({low + 1 + i: word for i, word in enumerate(WORDS)})
    for i in range(TINY_VOCAB_SIZE):
        names.setdefault(i, _filler(i) if low <= i < high else f"<special{i}>")
    return {word: i for i, word in names.items()}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny vocabulary (pad 0, bos 1, eos 2, ``<image>`` = the tiny image id)."""
    tok = Tokenizer(models.WordLevel(_vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    specials = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_processor() -> LlavaProcessor:
    """The tiny LLaVA's processor: ``<image>`` expands to 16 image tokens, images become 16 px pixel values."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS; the "default" strategy drops it again
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def save_tiny_llava_folder(folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Save the tiny random LLaVA (``build_tiny("llava")``) and :func:`make_processor` to ``folder``."""
    folder = Path(folder)
    case = build_tiny("llava", num_layers=num_layers, seed=seed)
    case.model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return folder


SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray")


def write_shape_questions(folder: str | Path, count: int = 8) -> Path:
    """easy-vqa-style questions on drawn shapes (64 px PNGs) as a JSONL beside them; returns the JSONL's path.

    Question ``i`` asks, in turn, for the shape, the colour, or yes/no about a shape; prompts differ in length, so
    batches are padded.
    """
    from PIL import Image, ImageDraw

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        shape, color = SHAPES[i % 3], COLORS[i % len(COLORS)]
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = 8 + i % 5, 10, 54, 54 - i % 7
        if shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif shape == "rectangle":
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) // 2, top)], fill=color)
        image.save(folder / f"{i}.png")
        asked = color if i // 3 % 2 == 0 else COLORS[(i + 1) % len(COLORS)]  # yes/no questions alternate
        question, answer, qtype = (
            ("what shape is in the image?", shape, "shape"),
            ("what color is the shape?", color, "color"),
            (f"is there a {asked} {shape} in the image?", "yes" if asked == color else "no", "yes/no"),
        )[i % 3]
        lines.append(json.dumps({"image": f"{i}.png", "question": question, "answer": answer, "type": qtype}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
