"""Vision towers the vLLM plugin builds itself, where vLLM's LLaVA has none (no vLLM import here).

vLLM 0.32's LLaVA builds CLIP, SigLIP and Pixtral towers only. A DINOv2 tower (vtexit's default model) is small, so
the plugin runs transformers' own ``Dinov2Model``: the same module, parameter names and hidden states as the
transformers path, called the way vLLM's LLaVA calls its tower (``tower(pixel_values, feature_select_strategy=...)``,
returning the features the projector reads).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from transformers import Dinov2Config, Dinov2Model

from vtexit.methods.visionzip.tower import SelectedLayer

DINOV2_TOWERS = ("dinov2",)
# transformers 5 names DINOv2's attention projections q/k/v/o_proj in memory but saves them under their checkpoint
# names (save_pretrained reverts its load-time renaming), which hub checkpoints use too.
CHECKPOINT_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


class Dinov2Tower(Dinov2Model):
    """transformers' ``Dinov2Model`` (its parameters named as a LLaVA checkpoint's ``model.vision_tower.*`` keys),
    returning the hidden states of ``feature_layer`` as transformers' ``LlavaModel.get_image_features`` selects them:
    one layer, or several concatenated on the feature dimension; with the ``"default"`` strategy the CLS token is
    dropped. Its attention runs with SDPA, as ``vtexit.load_default`` loads the model."""

    def __init__(self, config: Dinov2Config, feature_layer: int | list[int], attn_implementation: str = "sdpa"):
        config = copy.deepcopy(config)
        config._attn_implementation = attn_implementation
        super().__init__(config)
        self.feature_layer = feature_layer

    def forward(self, pixel_values: torch.Tensor, feature_select_strategy: str = "default") -> torch.Tensor:
        hidden = super().forward(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [hidden[layer] for layer in layers]
        if feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        elif feature_select_strategy != "full":
            raise ValueError(f"unknown vision_feature_select_strategy {feature_select_strategy!r}")
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def visionzip_inputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For VisionZip (one ``feature_layer``): that layer's output (images, 1 + patches, dim; CLS first), the CLS
        token's attention to each patch (images, patches) and the keys, mean over heads (images, 1 + patches,
        head_dim), recomputed from the layer's input by the transformers path's own code (its ``SelectedLayer``)."""
        count = self.config.num_hidden_layers
        index = self.feature_layer % (count + 1)
        block = self.encoder.layer[index - 1]
        hidden = super().forward(pixel_values, output_hidden_states=True).hidden_states
        layer = SelectedLayer(
            tower=self,
            feature_index=index,
            norm=block.norm1,
            query=block.attention.q_proj,
            key=block.attention.k_proj,
            heads=self.config.num_attention_heads,
            patches=hidden[index].shape[1] - 1,
        )
        attention, keys = layer.cls_attention_and_keys(hidden)
        return hidden[index], attention, keys

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy a checkpoint's tower tensors (names relative to the tower, as in ``model.vision_tower.*``; either
        transformers' checkpoint names or its in-memory ones) into the parameters; returns the names loaded. vLLM's
        loader hands a module its own weights this way."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            target = name
            if target not in params:
                for old, new in CHECKPOINT_NAMES:
                    target = target.replace(old, new)
            param = params.get(target)
            if param is None:
                raise ValueError(f"the DINOv2 tower has no parameter for the checkpoint tensor {name!r}")
            if param.shape != tensor.shape:
                raise ValueError(
                    f"DINOv2 tower tensor {name!r}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(target)
        return loaded


def build_dinov2_tower(hf_config) -> Dinov2Tower:
    """The tower of a LLaVA config whose ``vision_config`` is a ``Dinov2Config``."""
    return Dinov2Tower(hf_config.vision_config, hf_config.vision_feature_layer)
