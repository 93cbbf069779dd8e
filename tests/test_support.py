"""The support matrix in code (vtexit.methods.support) is what vtexit.apply accepts, family by family, and what
README.md's "Supported families and methods" table says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtexit
from vtexit.methods.support import ALL_FAMILIES, BEGIN_MARK, END_MARK, FAMILY_NAMES, SUPPORT, families_of, markdown
from vtexit.testing.tiny_models import FAMILIES, build_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples(model, gates: str) -> dict[str, list[dict]]:
    """A cheap representative config (or a few: all must be accepted) per row of the matrix."""
    text = model.config.get_text_config()
    heads = torch.ones(text.num_hidden_layers, text.num_attention_heads, dtype=torch.bool)
    heads[1:, ::2] = False
    return {
        "VTW, DyVTE": [{"method": "vtw", "layer": 2}, {"method": "dyvte", "gates": gates, "threshold": 0.5}],
        "FastV, PyramidDrop, random drop, DART": [
            {"method": "fastv", "layer": 2, "keep": 0.5},
            {"method": "pdrop", "layers": [2, 3], "keep": 0.5},
            {"method": "random_drop", "layer": 2, "keep": 0.5},
            {"method": "dart", "layer": 2, "keep": 0.5},
        ],
        "PyramidDrop with renumber=True": [{"method": "pdrop", "layers": [2, 3], "keep": 0.5, "renumber": True}],
        "DivPrune": [{"method": "divprune", "keep": 0.5}],
        "VisionZip": [{"method": "visionzip", "keep": 0.5}],
        "pooling": [{"method": "pool", "stride": 2}],
        "YOPO window": [{"method": "yopo", "window": 3}],
        "YOPO heads": [{"method": "yopo", "heads": heads}],
        "YOPO ffn_ratio, layer_drop": [{"method": "yopo", "ffn_ratio": 2, "layer_drop": 3}],
        "hybrid": [
            {"method": "hybrid", "pre": {"method": "divprune", "keep": 0.5}, "then": {"method": "vtw", "layer": 2}}
        ],
    }


def _accepted(model, configs: list[dict]) -> bool:
    for config in configs:
        try:
            vtexit.apply(model, config).remove()
        except ValueError:
            return False
    return True


def test_the_matrix_names_every_tiny_family_and_every_method():
    assert ALL_FAMILIES == FAMILIES and set(FAMILY_NAMES) == set(FAMILIES)
    assert {m for row in SUPPORT for m in row.methods} == set(vtexit.method_configs()) - {"none"}
    assert families_of("none") and all(families_of(name) for name in vtexit.method_configs())


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_accepts_exactly_what_the_matrix_says(family, tmp_path):
    model = build_tiny(family, num_layers=4).model
    gates = tmp_path / "gates"
    vtexit.DyVTEGates.for_model(model).save_pretrained(gates)
    examples = _examples(model, str(gates))
    assert set(examples) == {row.what for row in SUPPORT}
    for row in SUPPORT:
        assert _accepted(model, examples[row.what]) == (family in row.families), (row.what, family)


def test_readme_matrix_is_the_code_matrix():
    """README.md holds the generated matrix (``make matrix``), and its cells say what the rows say."""
    text = README.read_text()
    block = text.split(BEGIN_MARK)[1].split(END_MARK)[0].strip()
    assert block == markdown()
    header = next(line for line in block.splitlines() if line.startswith("| method |"))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == [FAMILY_NAMES[f] for f in FAMILIES]
    for row in SUPPORT:
        line = next(line for line in block.splitlines() if line.startswith(f"| {row.readme} |"))
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")][1:]
        if row.methods == ("hybrid",):
            continue
        assert tuple(f for f, cell in zip(FAMILIES, cells, strict=True) if cell == "✓") == row.families, row.what
        assert all(cell in ("✓", "✗") for cell in cells)
        assert (f"- {row.readme}, ✗ on" in block) == bool(row.refused)
