"""The dataset interface: easy-vqa and a user's JSONL give the same kind of records; subsets are reproducible."""

from __future__ import annotations

import json

import pytest

from vtexit.evaluation.datasets import EasyVQA
from vtexit.evaluation.datasets.jsonl import JsonlVQA
from vtexit.evaluation.datasets.select import fixed_subset, load_dataset


def test_jsonl_records_match_the_easy_vqa_records_they_were_written_from(tmp_path):
    source = [EasyVQA("test")[i] for i in (0, 5, 9)]
    lines = [
        json.dumps({"image": str(r.image_path), "question": r.question, "answer": r.answer.upper(), "type": r.qtype})
        for r in source
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    data = load_dataset(str(path))
    assert isinstance(data, JsonlVQA) and len(data) == 3
    for got, want in zip(data, source, strict=True):
        assert (got.image_path, got.question, got.answer, got.qtype) == (
            want.image_path,
            want.question,
            want.answer,
            want.qtype,
        )


def test_jsonl_relative_images_and_clear_errors(tmp_path):
    image = EasyVQA("test")[0].image_path
    (tmp_path / "img.png").write_bytes(image.read_bytes())
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"image": "img.png", "question": "what shape?", "answer": "circle"}))
    record = JsonlVQA(good)[0]
    assert record.image_path == tmp_path / "img.png" and record.qtype == "all"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img.png", "question": "q"}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) \['answer'\]"):
        JsonlVQA(bad)
    bad.write_text(json.dumps({"image": "nope.png", "question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="nope.png.*does not exist"):
        JsonlVQA(bad)
    with pytest.raises(ValueError, match="dataset must be"):
        load_dataset("something.csv")


def test_fixed_subset_is_reproducible_and_seed_dependent():
    data = EasyVQA("test")
    a, b, c = fixed_subset(data, 20, seed=0), fixed_subset(data, 20, seed=0), fixed_subset(data, 20, seed=1)
    assert [r.index for r in a] == [r.index for r in b] != [r.index for r in c]
    assert len({r.index for r in a}) == 20 and [r.index for r in a] == sorted(r.index for r in a)
