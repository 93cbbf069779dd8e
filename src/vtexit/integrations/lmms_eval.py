"""lmms-eval plugin: ``--model vtexit`` runs any local HF multimodal model under any vtexit method.

    python -m lmms_eval --model vtexit --model_args pretrained=PATH,method=vtw,layer=16 --tasks ...

``pretrained`` is a model folder (``AutoModelForImageTextToText`` + ``AutoProcessor``, loaded exactly as
``vtexit evaluate --model PATH`` loads it); without it, vtexit's default model. ``method`` names any registered
method and every other model argument is one of its settings (``vtexit.config_from_dict``); no method runs the
model unpatched. A hybrid names its steps' settings with dots:
``method=hybrid,pre.method=divprune,pre.keep=0.25,then.method=vtw,then.layer=8``. Generation is greedy, batched
(``--batch_size``) with left padding, in the task's document order.

lmms-eval finds this class through the ``lmms_eval.models`` entry point (``manifest``). The module imports only
lmms-eval's model base; vtexit's core never imports lmms-eval.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

MODEL_ID = "vtexit"
CLASS_PATH = f"{__name__}.VTExitLMM"
# Model arguments of the plugin itself; every other model argument is a setting of the method.
OWN_ARGS = (
    "pretrained",
    "method",
    "device",
    "dtype",
    "attn_implementation",
    "cache_implementation",
    "batch_size",
    "max_batch_size",
)
DEFAULT_MAX_NEW_TOKENS = 128


def manifest():
    """Entry-point payload: ``--model vtexit`` resolves to :class:`VTExitLMM` (imported only when used)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _rank_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and ``accelerate launch`` set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: the one asked for, else ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from None


def _dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be auto or a torch dtype name such as float32 or bfloat16, got {dtype!r}")
    return value


def _greedy_settings(gen_kwargs: dict[str, Any]) -> tuple[int, list[str]]:
    """(max_new_tokens, until strings) from a request's generation kwargs; sampling settings are ignored."""
    sampling = float(gen_kwargs.get("temperature") or 0) > 0 or (gen_kwargs.get("num_beams") or 1) > 1
    if gen_kwargs.get("do_sample") or sampling:
        warnings.warn(
            "the vtexit lmms-eval model generates greedily; do_sample/temperature/num_beams are ignored", stacklevel=3
        )
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation kwarg until must be a string or a list of strings, got {until!r}")
    return int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), until


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it if none occurs)."""
    cuts = [text.find(u) for u in until if u and u in text]
    return text[: min(cuts)] if cuts else text


class VTExitLMM(lmms):
    """A local HF multimodal model (or vtexit's default model) under a vtexit method, for lmms-eval."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
        cache_implementation: str = "dynamic",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        from vtexit.app.model_sources import load_source
        from vtexit.evaluation.batches import generate_cache_kwargs
        from vtexit.methods.patch import apply
        from vtexit.methods.registry import config_from_dict

        self.generate_cache = generate_cache_kwargs(cache_implementation)
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size must be an int >= 1 (auto is not supported)")
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.method_config = None
        if method not in (None, "", "none"):
            # Model arguments arrive converted to int/float/bool; the method's own text conversion is the one rule.
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}
            self.method_config = config_from_dict({"method": method, **text})
        elif settings:
            raise ValueError(
                f"unknown model arguments {sorted(settings)}: method settings need method=NAME; "
                f"the plugin's own arguments are {list(OWN_ARGS)}"
            )
        self._rank, self._world_size, local_rank = _rank_env()
        self._device = _device(device, local_rank, self._world_size)
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)  # collectives of lmms-eval's gather use the current device
        source = load_source(pretrained or "default", attn_implementation=attn_implementation)
        if source.processor is None:
            raise ValueError(f"pretrained must be a model folder with a processor, got {pretrained!r}")
        self.name = source.name
        self.processor = source.processor
        self.tokenizer = source.processor.tokenizer
        self.model = source.model.to(device=self._device, dtype=_dtype(dtype)).eval()
        # The patch stays for the whole run; its settings were checked against this model before it attached.
        self.handle = apply(self.model, self.method_config) if self.method_config is not None else None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    def prompt(self, context: str, images: int) -> str:
        """The processor's chat template with ``images`` images before the task's text (as ``vtexit evaluate``)."""
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in context:  # the task placed its images itself
            content = [{"type": "text", "text": context}]
        else:
            content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{image_token}\n" for item in content if item["type"] == "image") + context

    @torch.no_grad()
    def _generate(self, contexts: list[str], visuals: list[list], max_new_tokens: int) -> list[str]:
        texts = [self.prompt(c, len(v)) for c, v in zip(contexts, visuals, strict=True)]
        images = [image for row in visuals for image in row]
        inputs = self.processor(
            images=images or None, text=texts, return_tensors="pt", padding=True, padding_side="left"
        ).to(self._device)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            **self.generate_cache,
        )
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched in request order within each (task, generation settings) group."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            key = json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        answers: list[str | None] = [None] * len(requests)
        batches = sum(-(-len(indices) // self.batch_size) for indices in groups.values())
        progress = tqdm(total=batches, desc="Model Responding", disable=self.rank != 0)
        for indices in groups.values():
            max_new_tokens, until = _greedy_settings(dict(requests[indices[0]].args[1]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts, visuals = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    visuals.append(list(doc_to_visual(self.task_dict[task][split][doc_id]) or []))
                for i, text in zip(batch, self._generate(contexts, visuals, max_new_tokens), strict=True):
                    answers[i] = cut_at(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                progress.update(1)
        progress.close()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("the vtexit lmms-eval model answers generate_until tasks only")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the vtexit lmms-eval model answers generate_until tasks only")
