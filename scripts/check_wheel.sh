#!/usr/bin/env bash
# The built wheel, installed into an empty venv (no source tree on the path), imports vtexit, carries its data files
# (the default model's weights, the DyVTE gates, py.typed) and answers `vtexit --version`.
# Usage: scripts/check_wheel.sh VENV CONSTRAINTS   (CONSTRAINTS may be empty: what pip resolves today)
set -euo pipefail
venv=${1:-.venv-wheel}
constraints=${2:-}
out=build/wheel
rm -rf "$out" "$venv"
python3 -m pip wheel -q --no-deps -w "$out" .
wheel=$(ls "$out"/vtexit-*.whl)
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q ${constraints:+-c "$constraints"})
"${pip[@]}" torch==2.13.0  # first, so that pip keeps the CPU wheel (a bare torch pulls a CUDA build)
"${pip[@]}" "$wheel"
venv_abs=$(cd "$venv" && pwd)
cd "$(mktemp -d)"  # away from the checkout: the import must come from the installed wheel
"$venv_abs/bin/vtexit" --version
"$venv_abs/bin/python" - <<'PY'
from importlib.resources import files

import vtexit

root = files("vtexit")
assert "site-packages" in str(root), f"vtexit imported from {root}, not from the installed wheel"
for name in ("py.typed", "default_model/weights/default_adapter.safetensors",
             "methods/dyvte/default_gates/gates.safetensors", "methods/dyvte/default_gates/config.json"):
    assert root.joinpath(name).is_file(), f"the wheel lacks {name}"
from importlib.metadata import version

from vtexit.methods.dyvte.shipped import load_default_gates

load_default_gates()
print(f"wheel ok: vtexit {version('vtexit')} imported from {root}, with its data files")
PY
