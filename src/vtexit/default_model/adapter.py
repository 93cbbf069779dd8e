"""The small trained weights of the default model: the projector plus LoRA factors for the LM.

Stored as one safetensors file in a format of our own (not peft's) so that loading needs no peft: LoRA
factors are merged straight into the ``nn.Linear`` weights (``W += scale * B @ A``), leaving a plain
``LlavaForConditionalGeneration`` whose decoder layers other code can hook.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

WEIGHTS_DIR = Path(__file__).parent / "weights"
ADAPTER_FILE = WEIGHTS_DIR / "default_adapter.safetensors"
FORMAT = "vtexit-adapter-1"
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."  # lora.<module path under model.language_model>.{A,B}
LoraPair = tuple[torch.Tensor, torch.Tensor]


def save_adapter(
    path: Path,
    projector: dict[str, torch.Tensor],
    lora: dict[str, LoraPair],
    scale: float,
    info: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write projector weights and LoRA factors ``{module: (A [r,in], B [out,r])}`` to one file.

    float16 storage halves the file (it ships inside the package); loading merges in float32.
    """
    tensors = {PROJECTOR_PREFIX + k: v.detach().to(dtype).contiguous() for k, v in projector.items()}
    for module, (a, b) in lora.items():
        tensors[f"{LORA_PREFIX}{module}.A"] = a.detach().to(dtype).contiguous()
        tensors[f"{LORA_PREFIX}{module}.B"] = b.detach().to(dtype).contiguous()
    metadata = {"format": FORMAT, "lora_scale": repr(float(scale)), **(info or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def peft_lora_factors(module: nn.Module, adapter: str = "default") -> tuple[dict[str, LoraPair], float]:
    """Collect the LoRA factors that peft injected into ``module`` as ``{module path: (A, B)}`` and their scale."""
    from peft.tuners.lora import LoraLayer

    factors: dict[str, LoraPair] = {}
    scales = set()
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            factors[name] = (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
            scales.add(layer.scaling[adapter])
    if len(scales) != 1:
        raise ValueError(f"expected LoRA layers with one common scale, found scales {sorted(scales)}")
    return factors, scales.pop()


def adapter_metadata(path: Path = ADAPTER_FILE) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def apply_adapter(model: LlavaForConditionalGeneration, path: Path = ADAPTER_FILE) -> None:
    """Load the projector and merge LoRA factors into the LM weights, in place."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Trained default-model weights not found at {path}; reinstall vtexit, or run "
            "scripts/train_default_model.py to recreate them (or use load_default(trained=False))."
        )
    meta = adapter_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vtexit adapter file (format={meta.get('format')!r})")
    scale = float(meta["lora_scale"])
    tensors = load_file(str(path))

    projector = {k[len(PROJECTOR_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    if projector:  # a LoRA-only file (e.g. the withdrawal-tuned adapter) leaves the projector as it is
        model.model.multi_modal_projector.load_state_dict(projector, strict=True)

    lm = model.model.language_model
    modules = dict(lm.named_modules())
    names = {k[len(LORA_PREFIX) : -2] for k in tensors if k.startswith(LORA_PREFIX)}
    with torch.no_grad():
        for name in sorted(names):
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"adapter targets '{name}', which is not a Linear layer of the language model")
            a, b = tensors[f"{LORA_PREFIX}{name}.A"].float(), tensors[f"{LORA_PREFIX}{name}.B"].float()
            linear.weight += (scale * (b @ a)).to(linear.weight.dtype)
