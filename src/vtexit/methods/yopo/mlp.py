"""YOPO's sparse visual FFN: in a prefill, visual rows use only the first m/r intermediate neurons.

Visual and text rows are gathered apart; the visual block runs sliced matrix products (gate/up rows and down
columns ``[:neurons]``), the text block the full MLP. Decode steps (text only) and untouched calls run the module's
own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from vtexit.core.call_access import CallAccess
from vtexit.core.compiled import eager_under_compile
from vtexit.methods.yopo import sliced
from vtexit.methods.yopo.execution import runs_split
from vtexit.methods.yopo.rows import call_rows


def check_mlp(module: nn.Module) -> None:
    missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(module, n)]
    if missing:
        raise ValueError(
            f"ffn_ratio needs a gated MLP (gate/up/down projections); {type(module).__name__} lacks {missing}"
        )


class YOPOMLP:
    """Replacement MLP forwards of one patched model."""

    def __init__(self, engine: CallAccess, neurons: int, dense_below: int | None = None):
        self.engine = engine
        self.neurons = neurons
        self.dense_below = dense_below

    @eager_under_compile
    def forward(self, layer_idx: int, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        if engine.call_mode() != "prefill":
            return type(module).forward(module, hidden)
        if not runs_split(engine, hidden.device, self.dense_below):
            return self._dense(layer_idx, module, hidden)
        rows = call_rows(engine)
        text = type(module).forward(module, rows.text.gather(hidden))
        visual = rows.visual.gather(hidden)
        n = self.neurons
        first = slice(0, n)
        gate, up = sliced.outputs(module.gate_proj, visual, first), sliced.outputs(module.up_proj, visual, first)
        down = sliced.inputs(module.down_proj, module.act_fn(gate) * up, first, module.down_proj.in_features)
        engine.record_fraction(layer_idx, ffn=n / module.down_proj.in_features)
        return rows.assemble(text, down)

    def _dense(self, layer_idx: int, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The same FFN over the full rows: visual rows' neurons past the first m / r zeroed, nothing saved."""
        inner = module.act_fn(module.gate_proj(hidden)) * module.up_proj(hidden)
        engine = self.engine
        text = engine.call_memo("yopo dense text rows", lambda: (~engine.current_media()).unsqueeze(-1).to(inner.dtype))
        inner[..., self.neurons :].mul_(text)  # in place through the view: no write-back copy
        engine.record_fraction(layer_idx, ffn=1.0)
        return module.down_proj(inner)
