"""The README's Python examples run as written, in order, on a tiny LLaVA (names they assume are pre-seeded)."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

import vtexit
from vtexit.core import families
from vtexit.testing.tiny_models import build_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fenced block, in order."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.DOTALL | re.MULTILINE):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_python_blocks_are_found():
    sample = "x\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = 2\n```\n"
    assert python_blocks(sample) == [(2, "a = 1\n"), (9, "b = 2\n")]


@pytest.fixture
def namespace() -> dict:
    """What the examples take as given: a model, a batch for it, a layer K and calibration samples."""
    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.max_new_tokens = 3
    return {
        "model": case.model,
        "inputs": case.inputs([1, 0], text_len=[5, 3]),
        "K": 2,
        "samples": [case.inputs([1, 2], text_len=[4, 6], seed=s) for s in range(2)],
    }


def test_readme_python_examples_run(namespace):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "expected the 'Use' and 'Adding a model family' examples"
    # 'Adding a model family' registers a family globally: run it for real, then put the registry back as it was.
    registry = dict(families._REGISTRY)
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception:
                pytest.fail(f"README.md python block at line {line} raised:\n{code}\n{traceback.format_exc()}")
        assert "my_vlm" in vtexit.supported_model_types()  # the registration example really ran
    finally:
        families._REGISTRY.clear()
        families._REGISTRY.update(registry)
    assert "my_vlm" not in vtexit.supported_model_types()

    # The names the 'Use' example binds hold what its comments say.
    model, inputs = namespace["model"], namespace["inputs"]
    assert getattr(model, "_vtexit_engine", None) is None  # removed again after the block
    assert namespace["out"].shape == (2, inputs["input_ids"].shape[1] + 3)
    result = namespace["result"]
    low, n = vtexit.valid_layer_range(model)
    assert sorted(result.kl) == list(range(low, n + 1))
    assert result.layer == next(k for k in sorted(result.kl) if result.kl[k] <= 0.05)
