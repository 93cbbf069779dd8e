"""DyVTE's gates: one small MLP per candidate exit layer, saved as safetensors + a JSON config.

The gate of exit layer K reads the features of :mod:`vtexit.methods.dyvte.features` at the *input* of decoder layer
K (the output of layer K-1) and gives two logits, (stay, exit). A row whose exit probability passes the threshold
withdraws all its visual tokens before layer K, exactly like VTW at K for that row.

As in the public code each gate is ``Linear(2d -> h) -> GELU -> Linear(h -> 2)`` with xavier-uniform weights. Two
deliberate differences: the width h is sized to the model (``d // 8`` by default, so the gates of a small model
are a few MB; the public code uses 2048 for a 4096-wide LM), and every gate standardises its input with a fixed
shift and scale measured on its training features (hidden states have a few huge dimensions; without it a small
MLP trains poorly). The linear layers have biases (the public ones do not): the prior exit rate of a layer is a
large part of what a gate learns.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vtexit.core.families import FamilySpec, family_for

FORMAT = "vtexit-dyvte-gates-1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "gates.safetensors"


@dataclass(frozen=True)
class GatesConfig:
    """Shape of a set of gates and the model they belong to."""

    hidden_size: int  # the language model's hidden size d (a gate reads 2d features)
    num_layers: int  # decoder layers N of the model
    layers: tuple[int, ...]  # exit layers K that have a gate, ascending
    gate_size: int  # width h of each gate's hidden layer
    model_type: str = ""  # informative only (e.g. "llava")
    threshold: float = 0.5  # the exit threshold recommended with these gates (used when a patch gives none)

    def __post_init__(self) -> None:
        layers = tuple(int(k) for k in self.layers)
        object.__setattr__(self, "layers", layers)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.hidden_size < 1 or self.gate_size < 1 or self.num_layers < 1:
            raise ValueError(f"hidden_size, gate_size and num_layers must be >= 1, got {self}")
        if not layers or list(layers) != sorted(set(layers)) or not 0 < layers[0] <= layers[-1] < self.num_layers:
            raise ValueError(
                f"layers must be distinct ascending exit layers in [1, {self.num_layers - 1}], got {list(layers)}"
            )


class Gate(nn.Module):
    """One exit gate: standardise, ``Linear -> GELU -> Linear``, logits (stay, exit)."""

    def __init__(self, features: int, gate_size: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.fc1 = nn.Linear(features, gate_size)
        self.fc2 = nn.Linear(gate_size, 2)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1((features - self.shift) * self.scale)))


class DyVTEGates(nn.Module):
    """The gates of one model, one per exit layer in ``config.layers``."""

    def __init__(self, config: GatesConfig):
        super().__init__()
        self.config = config
        self.gates = nn.ModuleDict({str(k): Gate(2 * config.hidden_size, config.gate_size) for k in config.layers})
        self.source: str | None = None  # the folder it was loaded from, if any
        self.training_record = None  # a GateTraining when made by train_gates

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        layers: list[int] | None = None,
        gate_size: int | None = None,
        family: FamilySpec | None = None,
    ) -> DyVTEGates:
        """Freshly initialised gates sized to ``model``: by default one per exit layer the model accepts."""
        family = family or family_for(model)
        num_layers = len(family.resolve(model).layers)
        low = max(1, family.min_layer(model.config))
        text = model.config.get_text_config()
        allowed = list(range(low, num_layers))
        chosen = allowed if layers is None else sorted(set(layers))
        bad = [k for k in chosen if k not in allowed]
        if bad or not chosen:
            raise ValueError(f"layers must be exit layers in [{low}, {num_layers - 1}] for this model, got {layers}")
        size = gate_size if gate_size is not None else max(16, text.hidden_size // 8)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"gate_size must be an int >= 1, got {gate_size!r}")
        config = GatesConfig(text.hidden_size, num_layers, tuple(chosen), size, model.config.model_type)
        return cls(config)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    def set_default_threshold(self, threshold: float) -> None:
        """The threshold a patch uses when it is given none (saved with the gates)."""
        self.config = replace(self.config, threshold=float(threshold))

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch, 2) logits (stay, exit) of the gate of exit layer ``layer``."""
        return self.gates[str(layer)](features)

    def exit_probability(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch,) float32 probability of exiting before ``layer``."""
        return self(layer, features).float().softmax(dim=-1)[:, 1]

    def check_model(self, model: nn.Module, family: FamilySpec | None = None) -> None:
        """ValueError (naming ``gates``) unless these gates fit ``model``: hidden size, depth, exit layers."""
        family = family or family_for(model)
        num_layers = len(family.resolve(model).layers)
        hidden = model.config.get_text_config().hidden_size
        low = max(1, family.min_layer(model.config))
        if (hidden, num_layers) != (self.config.hidden_size, self.config.num_layers):
            raise ValueError(
                f"gates were made for a model with hidden size {self.config.hidden_size} and "
                f"{self.config.num_layers} decoder layers; this model has {hidden} and {num_layers}"
            )
        if self.config.layers[0] < low:
            raise ValueError(f"gates have an exit layer {self.config.layers[0]} < {low}, the first this model allows")

    def save_pretrained(self, folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``config.json`` and ``gates.safetensors`` (weights in ``dtype``) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        data = {"format": FORMAT, **asdict(self.config)}
        data["layers"] = list(self.config.layers)
        (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> DyVTEGates:
        """Gates saved by :meth:`save_pretrained` (float32 on the CPU; a patch moves them to the model)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"gates must be a folder written by DyVTEGates.save_pretrained ({CONFIG_FILE} + {WEIGHTS_FILE}), "
                f"got {str(folder)!r}"
            )
        data = json.loads((folder / CONFIG_FILE).read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"gates folder {str(folder)!r} is not in the format {FORMAT!r}")
        gates = cls(GatesConfig(**data))
        tensors = {name: t.float() for name, t in load_file(str(folder / WEIGHTS_FILE)).items()}
        gates.load_state_dict(tensors, strict=True)
        gates.source = str(folder)
        return gates.eval()

    def extra_repr(self) -> str:
        return f"layers={list(self.config.layers)}, gate_size={self.config.gate_size}"
