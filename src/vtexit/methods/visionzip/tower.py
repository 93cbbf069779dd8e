"""The vision tower layer VisionZip reads, found in a LLaVA-1.5-style model, and what it needs from it: the CLS
token's attention and the keys, recomputed from the layer's input (its norm and its query/key projections), so the
tower keeps its SDPA or FlashAttention kernels (no ``output_attentions``, no eager attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtexit.methods.visionzip.selection import cls_attention_and_keys

# Vision towers whose first token is a CLS token (VisionZip's dominant tokens are chosen by its attention).
CLS_TOWERS = ("clip_vision_model", "dinov2")
_NORMS = ("layer_norm1", "norm1")
_QUERIES, _KEYS = ("q_proj", "query"), ("k_proj", "key")


@dataclass(frozen=True)
class SelectedLayer:
    """The tower layer whose output the projector reads (``hidden_states[feature_index]``) and its parts."""

    tower: nn.Module
    feature_index: int  # into the tower's hidden_states, >= 1: the layer is feature_index - 1
    norm: nn.Module
    query: nn.Linear
    key: nn.Linear
    heads: int
    patches: int  # visual tokens per image in the prompt (image_seq_length; the CLS token is dropped)

    def cls_attention_and_keys(self, hidden_states: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, patches) the CLS token's attention to each patch, summed over heads, and (images, 1 + patches,
        head_dim) the keys, mean over heads, both from the layer's input ``hidden_states[feature_index - 1]``."""
        x = self.norm(hidden_states[self.feature_index - 1])
        return cls_attention_and_keys(self.query(x[:, :1]), self.key(x), self.heads)


def find_selected_layer(model: nn.Module, family_name: str) -> SelectedLayer:
    """The layer of ``model``'s vision tower that VisionZip reads; a ValueError says why a model is not supported."""
    config = model.config
    if family_name != "llava":
        raise ValueError(f"visionzip does not know the vision tower of the family {family_name!r}")
    vision = config.vision_config
    if vision.model_type not in CLS_TOWERS:
        raise ValueError(
            f"visionzip needs a vision tower with a CLS token ({', '.join(CLS_TOWERS)}), got {vision.model_type!r}"
        )
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "visionzip needs vision_feature_select_strategy='default' (the CLS token is not a prompt token), got "
            f"{config.vision_feature_select_strategy!r}"
        )
    layer = config.vision_feature_layer
    count = vision.num_hidden_layers
    if not isinstance(layer, int) or not -(count + 1) <= layer <= count or layer % (count + 1) == 0:
        raise ValueError(
            f"visionzip needs one vision_feature_layer that is a tower layer's output (1..{count} or "
            f"-{count}..-1), got {layer!r}"
        )
    tower = model.model.vision_tower
    index = layer % (count + 1)
    block = _encoder_layers(tower, count)[index - 1]
    return SelectedLayer(
        tower=tower,
        feature_index=index,
        norm=_attribute(block, _NORMS, "pre-attention norm"),
        query=_projection(block, _QUERIES),
        key=_projection(block, _KEYS),
        heads=vision.num_attention_heads,
        patches=config.image_seq_length,
    )


def _encoder_layers(tower: nn.Module, count: int) -> nn.ModuleList:
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"visionzip found no list of {count} layers in the vision tower {type(tower).__name__}")


def _attribute(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise ValueError(f"visionzip found no {what} ({' or '.join(names)}) in {type(block).__name__}")


def _projection(block: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    found = [m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear)]
    if len(found) != 1:
        raise ValueError(f"visionzip found {len(found)} attention projections named {names} in {type(block).__name__}")
    return found[0]
