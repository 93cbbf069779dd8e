"""Data-parallel evaluation: ``torchrun --nproc_per_node 2 -m vtexit.app.parallel evaluate`` (2 CPU processes, gloo)
writes one result file whose answers and FLOPs are exactly those of a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import vtexit
from vtexit.app.model_sources import load_source
from vtexit.evaluation.datasets.jsonl import JsonlVQA
from vtexit.evaluation.distributed import active, data_parallel, gather_union, is_main_process, ranks_from_env
from vtexit.evaluation.evaluate import evaluate_interleaved
from vtexit.testing.tiny_folder import save_tiny_llava_folder, write_shape_questions

LAYER = 2


def test_two_processes_give_the_single_process_results(tmp_path):
    folder = save_tiny_llava_folder(tmp_path / "tiny")
    questions = write_shape_questions(tmp_path / "data", count=11)  # 6 batches: 0, 2, 4 on rank 0; 1, 3, 5 (1 row) on 1
    out = tmp_path / "dp.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vtexit.app.parallel", "evaluate", "--model", str(folder), "--dataset", str(questions),
        "--rows", "11", "--batch-size", "2", "--layer", str(LAYER), "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    merged = json.loads(out.read_text())

    source = load_source(str(folder))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1)
    try:
        single = evaluate_interleaved(
            source.model,
            source.processor,
            list(JsonlVQA(questions)),
            source.prompt,
            {"baseline": None, f"VTW K={LAYER}": lambda m: vtexit.withdraw(m, layer=LAYER)},
            batch_size=2,
            progress=False,
        )
    finally:
        torch.set_num_threads(before)
    assert [r["name"] for r in merged] == [r.name for r in single]
    for got, want in zip(merged, single, strict=True):
        want = want.to_dict()
        assert got["answers"] == want["answers"]  # predictions, correctness and FLOPs of every row, in order
        same = ("n", "accuracy", "per_type", "count_per_type", "prefill_flops_per_sample", "decode_flops_per_token")
        for key in same:
            assert got[key] == want[key], key
    assert merged[0]["answers"] != merged[1]["answers"]


def test_one_process_changes_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with data_parallel() as ranks:
        assert (ranks.rank, ranks.world_size) == (0, 1)
        assert active() is None and is_main_process()
        assert gather_union({3: "x"}) == {3: "x"}
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(("rank", "world"), [("2", "2"), ("0", "0"), ("a", "2")])
def test_bad_launcher_environment_is_refused(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
        ranks_from_env()
