"""Linear layers on a subset of their outputs or inputs: where YOPO's savings are made.

For a plain ``nn.Linear`` the weight is sliced, so the skipped rows or columns are never multiplied. Any other
module in a linear's place (a peft LoRA wrapper while tuning, a quantised linear) keeps its own forward: the full
product is computed and sliced, or fed zeros in the unused inputs. That is the same function, without the saving.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def outputs(linear: nn.Module, x: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """``linear(x)[..., index]``."""
    if type(linear) is nn.Linear:
        bias = None if linear.bias is None else linear.bias[index]
        return F.linear(x, linear.weight[index], bias)
    return linear(x)[..., index]


def inputs(linear: nn.Module, x: torch.Tensor, index: torch.Tensor | slice, in_features: int) -> torch.Tensor:
    """``linear(z)`` where ``z`` holds ``x`` at the input features ``index`` and zeros elsewhere."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight[:, index], linear.bias)
    if isinstance(index, slice):
        index = torch.arange(in_features, device=x.device)[index]
    full = x.new_zeros(*x.shape[:-1], in_features)
    return linear(full.index_copy(x.ndim - 1, index, x))
