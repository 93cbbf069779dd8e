"""The plugin's wiring and refusals: the entry point, the tested-version warning, and the settings it refuses."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import vtexit
from vtexit.integrations.vllm import ARCHITECTURE, compat
from vtexit.integrations.vllm.reduction import ImageReduction


def test_entry_point_registers_the_model():
    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert plugins["vtexit"].value == "vtexit.integrations.vllm:register"
    plugins["vtexit"].load()()
    from vllm import ModelRegistry

    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_tested_releases():
    assert compat.is_tested("0.32.0") and compat.is_tested("0.32.3+cpu")
    assert not compat.is_tested("0.33.0") and not compat.is_tested("0.31.2") and not compat.is_tested("dev")


def test_untested_release_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.0")
    with caplog.at_level(logging.WARNING, logger="vtexit.integrations.vllm"):
        compat.warn_if_untested()
        compat.warn_if_untested()
    assert [r.getMessage().count("0.40.0") for r in caplog.records] == [1]


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"method": "vtw", "layer": 2}, "'vtw' is not supported there"),
        ({"method": "fastv", "layer": 1, "keep": 0.5}, "'fastv' is not supported there"),
        ({"method": "visionzip", "keep": 0.25, "contextual_share": 1}, "contextual_share"),
        ({"method": "pool", "stride": 1}, "stride"),
        ({"method": "divprune", "keep": 0}, "keep"),
        ("pool", "must be a method's dict"),
    ],
)
def test_refused_settings(setting, match):
    with pytest.raises(ValueError, match=match):
        ImageReduction.from_setting(setting)


def test_stride_wider_than_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"larger than this model's 4 x 4 grid"):
        ImageReduction.from_setting({"method": "pool", "stride": 5}).count(16)


def test_missing_method_is_refused():
    from vtexit.integrations.vllm.model import reduction_of

    class Config:
        pass

    with pytest.raises(ValueError, match="hf_overrides"):
        reduction_of(Config())


def test_only_compat_imports_vllm():
    """Every vLLM internal the plugin uses goes through compat.py (decoder_compat.py for VTW inside the decoder);
    nothing else in vtexit imports vLLM."""
    src = Path(vtexit.__file__).parent
    importers = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "vllm" for n in names):
                importers.append(path.relative_to(src).as_posix())
    assert sorted(set(importers)) == ["integrations/vllm/compat.py", "integrations/vllm/decoder_compat.py"]


def test_importing_vtexit_does_not_import_vllm():
    code = "import sys, vtexit, vtexit.integrations.vllm; assert not [m for m in sys.modules if m.startswith('vllm')]"
    subprocess.run([sys.executable, "-c", code], check=True)
