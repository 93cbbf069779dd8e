"""A VQA question set as an lmms-eval task: a JSONL of the questions and a task YAML, scored like vtexit's evaluator.

``write_vqa_task(records, folder)`` writes ``<name>.jsonl`` (image paths made absolute, so the task runs from any
folder) and ``<name>.yaml`` (``dataset_path: json``, passed to lmms-eval with ``--include_path folder``). The YAML
names the functions below by their module path; lmms-eval imports them when it loads the task. The metric is
vtexit's exact match of the first word (:func:`vtexit.evaluation.evaluate.normalise_answer`), so accuracy through
lmms-eval and through ``vtexit evaluate`` mean the same thing. Importing this module does not import lmms-eval.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vtexit.evaluation.datasets import VQARecord
from vtexit.evaluation.evaluate import normalise_answer

__all__ = ["doc_to_text", "doc_to_visual", "process_results", "write_vqa_task"]

_MODULE = "vtexit.integrations.lmms_eval_task"  # not __name__: that is "__main__" under python -m
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's image, opened the way vtexit's evaluator opens it (RGB)."""
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Exact match of the generation's first word (lowercased) against the answer, as in vtexit's evaluator."""
    return {"exact_match": float(normalise_answer(results[0]) == str(doc["answer"]).lower().strip())}


def task_yaml(name: str, data_file: str, max_new_tokens: int) -> str:
    """The task definition; ``until`` is empty so generations are not cut (vtexit's evaluator does not cut)."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_visual: !function {_MODULE}.doc_to_visual
doc_to_text: !function {_MODULE}.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  until: []
process_results: !function {_MODULE}.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_vqa_task(
    records: Sequence[VQARecord], folder: str | Path, *, name: str = "vtexit_vqa", max_new_tokens: int = 4
) -> Path:
    """Write ``records`` (easy-vqa or a JSONL set, e.g. a ``fixed_subset``) as lmms-eval task ``name`` in
    ``folder``; returns the YAML's path. Run it with ``--include_path folder --tasks name``."""
    if not records:
        raise ValueError("records is empty: a task needs at least one question")
    if not _NAME.match(name):
        raise ValueError(f"name must be a Python-style identifier (letters, digits, _), got {name!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"image": str(Path(r.image_path).resolve()), "question": r.question, "answer": r.answer, "type": r.qtype}
        for r in records
    ]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / f"{name}.yaml"
    path.write_text(task_yaml(name, f"{name}.jsonl", max_new_tokens))
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m vtexit.integrations.lmms_eval_task --out tasks``: the questions ``vtexit evaluate`` would ask
    (same dataset, ``--rows`` and ``--seed``) as an lmms-eval task."""
    import argparse

    from vtexit.evaluation.datasets.select import fixed_subset, load_dataset

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset", default="easy-vqa", help="'easy-vqa' (test split) or a .jsonl file")
    parser.add_argument("--rows", type=int, default=200, help="fixed subset size (seeded, as vtexit evaluate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="vtexit_vqa", help="task name")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder for the task (pass it as --include_path)")
    args = parser.parse_args(argv)
    try:
        records = fixed_subset(load_dataset(args.dataset, "test"), args.rows, args.seed)
        path = write_vqa_task(records, args.out, name=args.name, max_new_tokens=args.max_new_tokens)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {path} ({len(records)} questions); run it with --include_path {args.out} --tasks {args.name}")
    return path


if __name__ == "__main__":
    main()
