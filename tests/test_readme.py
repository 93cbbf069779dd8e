"""The Python examples of README.md and of every page under docs/ run as written, on a tiny LLaVA.

Each file's ```python blocks run in order in one fresh namespace, pre-seeded with the names the examples take as
given (a model, a batch for it, a layer K and calibration samples). A snippet that must not run here (shell
commands, a real hub model) is fenced with another language (```bash, ```text); other spellings of Python
(```py, ```python3, ...) are refused, so that no Python example escapes this test.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

import vtexit
from vtexit.core import families
from vtexit.testing.tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})[ \t]*([^\s`{]*)", flags=re.MULTILINE)
# Fence languages that would hold Python without running here.
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "ipython3", "pyi"}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fenced block, in order."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.DOTALL | re.MULTILINE):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def fence_languages(text: str) -> list[tuple[int, str, bool]]:
    """(line number, language, indented) of every opening code fence, in order ('' when unnamed)."""
    fences, open_fence = [], None
    for match in FENCE.finditer(text):
        indent, marker, language = match.group(1), match.group(2), match.group(3).lower()
        if open_fence is None:
            fences.append((text.count("\n", 0, match.start()) + 1, language, bool(indent)))
            open_fence = marker
        elif marker[0] == open_fence[0] and len(marker) >= len(open_fence) and not language:
            open_fence = None
    return fences


def hidden_python(text: str) -> list[tuple[int, str]]:
    """Fences that hold Python but would not run: another spelling of Python, or a ```python fence indented (inside
    a list), which python_blocks does not take."""
    return [
        (line, language)
        for line, language, indented in fence_languages(text)
        if language in PYTHON_ALIASES or (language == "python" and indented)
    ]


def test_python_blocks_are_found():
    sample = "x\n```python\na = 1\n```\ntext\n```bash\nls\n```\n```python\nb = 2\n```\n"
    assert python_blocks(sample) == [(2, "a = 1\n"), (9, "b = 2\n")]
    assert fence_languages(sample) == [(2, "python", False), (6, "bash", False), (9, "python", False)]
    nested = "````markdown\n```py\n```\n````\n```text\n```\n- item\n\n    ```python\n    a = 1\n    ```\n"
    assert fence_languages(nested) == [(1, "markdown", False), (5, "text", False), (9, "python", True)]
    assert hidden_python(nested) == [(9, "python")] and hidden_python("```py\nx\n```\n") == [(1, "py")]


def test_the_pages_are_found():
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/index.md", "docs/methods/vtw.md", "docs/writing-a-method.md"} <= names
    assert sum(bool(python_blocks(page.read_text())) for page in PAGES) >= 10


def seeded_namespace() -> dict:
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


def run_blocks(page: Path, namespace: dict) -> set[str]:
    """Run the page's ```python blocks in order in ``namespace``; return the model types they registered, and put
    the family registry back as it was (an example may register a family)."""
    name = page.relative_to(ROOT).as_posix()
    registry = dict(families._REGISTRY)
    try:
        for line, code in python_blocks(page.read_text()):
            try:
                exec(compile(code, f"{name}:{line}", "exec"), namespace)
            except Exception:
                pytest.fail(f"{name} python block at line {line} raised:\n{code}\n{traceback.format_exc()}")
        return set(vtexit.supported_model_types()) - set(registry)
    finally:
        families._REGISTRY.clear()
        families._REGISTRY.update(registry)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_python_examples_run(page):
    text = page.read_text()
    hidden = hidden_python(text)
    assert not hidden, f"Python that would not run (fence it ```python, or ```text if it must not run): {hidden}"
    if not python_blocks(text):
        return
    namespace = seeded_namespace()
    registered = run_blocks(page, namespace)
    assert getattr(namespace["model"], "_vtexit_engine", None) is None  # every example removes its patch again
    if page == README:
        check_readme_names(namespace, registered)


def check_readme_names(namespace: dict, registered: set[str]) -> None:
    """The names the README's examples bind hold what their comments say."""
    assert len(python_blocks(README.read_text())) >= 7  # VTW, configs, DyVTE, YOPO, pre-LLM, hybrid, a family
    assert registered == {"my_vlm"}  # 'Adding a model family' really ran ...
    assert "my_vlm" not in vtexit.supported_model_types()  # ... and the registry is as it was
    model, inputs = namespace["model"], namespace["inputs"]
    # VTW: 'out' is a plain generate's output; 'result' holds the whole KL curve and the first K under eta.
    assert namespace["out"].shape == (2, inputs["input_ids"].shape[1] + 3)
    result = namespace["result"]
    low, n = vtexit.valid_layer_range(model)
    assert sorted(result.kl) == list(range(low, n + 1))
    assert result.layer == next(k for k in sorted(result.kl) if result.kl[k] <= 0.05)
    # DyVTE: gates saved and loaded again; one exit layer per row (N = never).
    assert isinstance(namespace["gates"], vtexit.DyVTEGates)
    assert len(namespace["exits"]) == 2 and all(low <= int(k) <= n for k in namespace["exits"])
    # YOPO: a head mask from calibrate_heads. The last config the README binds is the hybrid's, by name.
    assert isinstance(namespace["heads"], vtexit.HeadMask)
    assert isinstance(namespace["config"], vtexit.HybridConfig)
    assert vtexit.config_from_dict(namespace["config"].to_dict()) == namespace["config"]
    assert namespace["generated"].shape == (2, inputs["input_ids"].shape[1] + 3)


def test_readme_links_into_the_docs_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
