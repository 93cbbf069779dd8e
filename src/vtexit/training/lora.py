"""LoRA on the language model of any supported family: add (peft), save, load unmerged or merged.

Files use the default model's adapter format (``vtexit.default_model.adapter``: safetensors, keys
``lora.<module path under the language model>.{A,B}``, the scale in the metadata), so a tuned adapter loads with
no peft at all when merged, and exactly (peft, unmerged) when a round trip must give identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vtexit.core.families import FamilySpec, family_for
from vtexit.default_model.adapter import (
    FORMAT,
    LORA_PREFIX,
    LoraPair,
    adapter_metadata,
    peft_lora_factors,
    save_adapter,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, alpha (scale = alpha / r), dropout and the Linear module names it wraps in the language model."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora rank r must be an int >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("lora targets must name at least one module")


DEFAULT_LORA = LoraSettings()


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft ``PeftModel`` wrapper (vtexit patches and resolves that one)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def language_model(model: nn.Module, family: FamilySpec | None = None) -> nn.Module:
    model = base_model(model)
    return (family or family_for(model)).resolve(model).language_model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def add_lora(model: nn.Module, settings: LoraSettings = DEFAULT_LORA, family: FamilySpec | None = None) -> None:
    """Wrap the language model's target Linear layers with fresh LoRA factors (peft), in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(settings.targets)
    )
    inject_adapter_in_model(config, language_model(model, family))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in base_model(model).named_parameters() if "lora_" in n]


def lora_factors(model: nn.Module, family: FamilySpec | None = None) -> tuple[dict[str, LoraPair], float]:
    """``{module path under the language model: (A [r, in], B [out, r])}`` and the common scale."""
    return peft_lora_factors(language_model(model, family))


def save_lora(
    model: nn.Module,
    path: str | Path,
    info: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
    family: FamilySpec | None = None,
) -> Path:
    """Write the model's LoRA factors (no projector) to one safetensors file."""
    factors, scale = lora_factors(model, family)
    path = Path(path)
    save_adapter(path, {}, factors, scale, info, dtype)
    return path


def _read(path: str | Path) -> tuple[dict[str, LoraPair], float]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    meta = adapter_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vtexit adapter file (format={meta.get('format')!r})")
    tensors = load_file(str(path))
    names = sorted({k[len(LORA_PREFIX) : -2] for k in tensors if k.startswith(LORA_PREFIX)})
    if not names:
        raise ValueError(f"{path} holds no LoRA factors")
    factors = {n: (tensors[f"{LORA_PREFIX}{n}.A"], tensors[f"{LORA_PREFIX}{n}.B"]) for n in names}
    return factors, float(meta["lora_scale"])


def _linears(model: nn.Module, names: list[str], family: FamilySpec | None) -> dict[str, nn.Linear]:
    modules = dict(language_model(model, family).named_modules())
    found = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"adapter targets '{name}', which is not a Linear layer of the language model")
        found[name] = module
    return found


def merge_lora(model: nn.Module, path: str | Path, family: FamilySpec | None = None) -> None:
    """Merge saved factors into the language model's weights (``W += scale * B @ A`` in float32), in place:
    the model stays a plain transformers model that every method can patch, and loading needs no peft."""
    factors, scale = _read(path)
    with torch.no_grad():
        for name, linear in _linears(model, list(factors), family).items():
            a, b = factors[name]
            linear.weight += (scale * (b.float() @ a.float())).to(linear.weight.dtype)


def load_lora(model: nn.Module, path: str | Path, family: FamilySpec | None = None) -> None:
    """Add LoRA layers (peft, unmerged) holding the saved factors: the model computes exactly what the saved one did
    (bit for bit when the file was written in the model's dtype); training can continue from them."""
    factors, scale = _read(path)
    ranks = {a.shape[0] for a, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"{path} mixes LoRA ranks {sorted(ranks)}")
    rank = ranks.pop()
    linears = _linears(model, list(factors), family)
    add_lora(model, LoraSettings(r=rank, alpha=scale * rank, targets=tuple(linears)), family)
    from peft.tuners.lora import LoraLayer

    modules = dict(language_model(model, family).named_modules())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = modules[name]
            assert isinstance(layer, LoraLayer)
            layer.scaling["default"] = scale
            weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            weight_a.copy_(a.to(weight_a.dtype))
            weight_b.copy_(b.to(weight_b.dtype))
