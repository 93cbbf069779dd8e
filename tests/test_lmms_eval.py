"""The lmms-eval plugin end to end, offline: lmms-eval's own CLI (``python -m lmms_eval --model vtexit``) on a local
task gives the answers and accuracy of vtexit's evaluator on the same questions, unpatched and under VTW.

The model is the tiny random LLaVA saved with a word-level processor; half of the questions get, as their answer,
the unpatched model's greedy first word computed row by row with plain ``generate`` (no vtexit, no lmms-eval), so
the accuracy is not trivially 0.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

import vtexit
from vtexit.app.model_sources import load_source
from vtexit.evaluation.datasets.jsonl import JsonlVQA
from vtexit.evaluation.evaluate import evaluate
from vtexit.integrations.lmms_eval_task import main as task_main
from vtexit.integrations.lmms_eval_task import write_vqa_task
from vtexit.testing.tiny_folder import save_tiny_llava_folder, write_shape_questions

needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (make setup installs it: pip install --no-deps lmms-eval==0.7.3 "
    "and pip install 'vtexit[lmms]')",
)

LAYER = 2  # VTW on the 4-layer tiny model
BATCH = 4
NEW_TOKENS = 4
TASK = "vtexit_shapes"


def first_word(text: str) -> str:
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    return words[0] if words else ""


@contextmanager
def one_thread():
    """The lmms-eval subprocess runs with OMP_NUM_THREADS=1; the in-process references do too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def greedy_row_by_row(source, records) -> list[str]:
    """Each question alone through the unpatched model's own generate (no padding, no vtexit)."""
    words = []
    for r in records:
        inputs = source.processor(
            images=[Image.open(r.image_path).convert("RGB")], text=[source.prompt(r.question)], return_tensors="pt"
        )
        out = source.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        words.append(first_word(source.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])))
    return words


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    folder = save_tiny_llava_folder(root / "tiny")
    source = load_source(str(folder))
    questions = write_shape_questions(root / "data", count=8)
    with one_thread():
        hand = greedy_row_by_row(source, list(JsonlVQA(questions)))
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    for i in range(0, len(rows), 2):  # even questions: the model's own answer, so accuracy is >= 50%
        rows[i]["answer"] = hand[i]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = list(JsonlVQA(questions))
    write_vqa_task(records, root / "task", name=TASK, max_new_tokens=NEW_TOKENS)
    return root, folder, source, records, hand


def run_lmms_eval(root: Path, folder: Path) -> dict[str, tuple[float, list[str]]]:
    """Both configurations in one ``python -m lmms_eval --config`` run; name -> (accuracy, answers by doc)."""
    runs = {"unpatched": f"pretrained={folder}", "vtw": f"pretrained={folder},method=vtw,layer={LAYER}"}
    config = [
        {
            "model": "vtexit",
            "model_args": args,
            "tasks": TASK,
            "include_path": str(root / "task"),
            "batch_size": BATCH,
            "log_samples": True,
            "output_path": str(root / "out" / name),
        }
        for name, args in runs.items()
    ]
    (root / "runs.yaml").write_text(json.dumps(config))  # JSON is YAML
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--config", str(root / "runs.yaml")],
        cwd=root,
        env={**os.environ, **offline, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    found = {}
    for name in runs:  # lmms-eval logs a failed run and still exits 0: no result file then
        files = sorted((root / "out" / name).rglob("*.json*"))
        assert len(files) == 2, log
        results, samples = sorted(files, key=lambda f: f.name.endswith(".jsonl"))
        accuracy = json.loads(results.read_text())["results"][TASK]["exact_match,none"]
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
        found[name] = (accuracy, [first_word(d["filtered_resps"]) for d in docs])
    return found


def test_only_the_integration_imports_lmms_eval():
    """vtexit's core, methods, evaluation and app never import lmms-eval (it resets loguru and is optional)."""
    src = Path(vtexit.__file__).parent
    importers = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "lmms_eval" for n in names):
                importers.append(path.relative_to(src).as_posix())
    assert sorted(set(importers)) == ["integrations/lmms_eval.py"]


@needs_lmms_eval
def test_plugin_is_registered_through_the_entry_point():
    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtexit"]
    manifest = entry.load()()
    assert (manifest.model_id, manifest.simple_class_path) == ("vtexit", "vtexit.integrations.lmms_eval.VTExitLMM")


@needs_lmms_eval
def test_lmms_eval_gives_the_answers_and_accuracy_of_vtexits_evaluator(setup):
    root, folder, source, records, hand = setup
    through_lmms = run_lmms_eval(root, folder)
    with one_thread():
        own = {
            "unpatched": evaluate(source.model, source.processor, records, source.prompt, batch_size=BATCH),
            "vtw": evaluate(
                source.model,
                source.processor,
                records,
                source.prompt,
                method=lambda m: vtexit.withdraw(m, layer=LAYER),
                batch_size=BATCH,
            ),
        }
    for name, result in own.items():
        accuracy, answers = through_lmms[name]
        assert answers == [a.prediction for a in result.answers], name
        assert accuracy == result.accuracy, name
    assert through_lmms["unpatched"][1] == hand  # batched and left-padded, the same as each row alone
    assert through_lmms["unpatched"][0] >= 0.5
    assert through_lmms["vtw"][1] != through_lmms["unpatched"][1]  # the method really ran inside lmms-eval


def test_task_command_writes_a_task_whose_functions_import(setup, tmp_path):
    questions = setup[3][0].image_path.parent / "questions.jsonl"
    path = task_main(["--dataset", str(questions), "--rows", "3", "--name", "three", "--out", str(tmp_path)])
    targets = re.findall(r"!function (\S+)", path.read_text())
    assert len(targets) == 3
    for target in targets:
        module, name = target.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name))
    assert len((tmp_path / "three.jsonl").read_text().splitlines()) == 3


def test_task_writer_refuses_bad_arguments(setup, tmp_path):
    records = setup[3]
    with pytest.raises(ValueError, match="records is empty"):
        write_vqa_task([], tmp_path)
    with pytest.raises(ValueError, match="name must be"):
        write_vqa_task(records, tmp_path, name="my-task")
    with pytest.raises(ValueError, match="max_new_tokens"):
        write_vqa_task(records, tmp_path, max_new_tokens=0)


@needs_lmms_eval
def test_plugin_refuses_bad_model_arguments(setup):
    from vtexit.integrations.lmms_eval import VTExitLMM

    folder = str(setup[1])
    with pytest.raises(ValueError, match="layer must be in"):
        VTExitLMM(pretrained=folder, method="vtw", layer=99)
    with pytest.raises(ValueError, match="method must be one of"):
        VTExitLMM(pretrained=folder, method="nope")
    with pytest.raises(ValueError, match="need method=NAME"):
        VTExitLMM(pretrained=folder, layer=2)
    with pytest.raises(ValueError, match="batch_size"):
        VTExitLMM(pretrained=folder, batch_size="auto")
    with pytest.raises(ValueError, match="keep must be in"):
        VTExitLMM(pretrained=folder, method="divprune", keep="2")
    with pytest.raises(ValueError, match="cache_implementation must be one of"):
        VTExitLMM(pretrained=folder, cache_implementation="offloaded")
    lmm = VTExitLMM(pretrained=folder, method="divprune", keep="0.25")  # a pre-LLM method, as model_args give it
    assert lmm.method_config == vtexit.DivPruneConfig(keep=0.25) and vtexit.patch_of(lmm.model) is lmm.handle
    hybrid = {"pre.method": "divprune", "pre.keep": 0.25, "then.method": "vtw", "then.layer": 2}  # dotted model_args
    lmm.handle.remove()
    lmm = VTExitLMM(pretrained=folder, method="hybrid", **hybrid)
    expected = vtexit.HybridConfig(pre={"method": "divprune", "keep": 0.25}, then={"method": "vtw", "layer": 2})
    assert lmm.method_config == expected and vtexit.patch_of(lmm.model) is lmm.handle


@needs_lmms_eval
@torch.no_grad()
@pytest.mark.parametrize("method", [{"method": "vtw", "layer": LAYER}, {"method": "divprune", "keep": 0.25}])
def test_plugin_on_a_static_cache_answers_as_on_the_dynamic_one(setup, method):
    """``cache_implementation=static`` (transformers' static cache; compiled decode on a GPU): the same answers, a
    padded batch at a time, as the default cache, under an in-LLM and a pre-LLM method."""
    from vtexit.integrations.lmms_eval import VTExitLMM

    folder, records = str(setup[1]), setup[3][:BATCH]
    contexts = [r.question for r in records]
    visuals = [[Image.open(r.image_path).convert("RGB")] for r in records]
    answers = {}
    for cache in ("dynamic", "static"):
        lmm = VTExitLMM(pretrained=folder, cache_implementation=cache, **method)
        with one_thread():
            answers[cache] = lmm._generate(contexts, visuals, NEW_TOKENS)
        # A static decode step attends over every slot of its buffers: the same keys at every step.
        keys = [step.layers[0].keys for step in lmm.handle.last_cost.decode]
        assert len(keys) == NEW_TOKENS - 1
        assert all(torch.equal(keys[0], k) for k in keys[1:]) == (cache == "static")
        lmm.handle.remove()
    assert answers["static"] == answers["dynamic"]
    assert len(set(answers["dynamic"])) > 1  # the answers differ between questions: the batch's rows were read
