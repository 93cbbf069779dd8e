"""VisionZip before the language model. Two hooks on the vision tower make each image's VisionZip tokens (see
:mod:`vtexit.methods.visionzip.selection`) the first ``dominant + contextual`` of its visual tokens; the event before
decoder layer 0 then keeps those slots and drops the rest of each image, with positions renumbered: the language model
sees the prompt VisionZip builds, ``[text, CLS, dominant patches, contextual tokens, text]``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.fastv.ranking import record_kept
from vtexit.methods.visionzip.selection import visionzip_tokens
from vtexit.methods.visionzip.tower import SelectedLayer


class VisionZipPolicy(Policy):
    """Each image keeps ``dominant`` (CLS included) + ``contextual`` tokens."""

    event_layers = frozenset({0})
    renumber_positions = True

    def __init__(self, layer: SelectedLayer, dominant: int, contextual: int):
        self.layer, self.dominant, self.contextual = layer, dominant, contextual

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def outer_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        tower = self.layer.tower
        return [
            tower.register_forward_pre_hook(_all_hidden_states, with_kwargs=True),
            tower.register_forward_hook(self._zip),
        ]

    def _zip(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """The tower's output with each image's VisionZip tokens right after its CLS token in the selected layer."""
        states = output.hidden_states
        features = states[self.layer.feature_index]
        if features.shape[1] != 1 + self.layer.patches:
            raise ValueError(
                f"visionzip expects 1 + image_seq_length = {1 + self.layer.patches} tokens per image from the vision "
                f"tower, got {features.shape[1]}"
            )
        attention, keys = self.layer.cls_attention_and_keys(states)
        zipped = visionzip_tokens(features, attention, keys, self.dominant, self.contextual)
        features = torch.cat([features[:, :1], zipped, features[:, 1 + self.tokens :]], dim=1)
        index = self.layer.feature_index
        output.hidden_states = (*states[:index], features, *states[index + 1 :])
        return output

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        media = view.media
        rank = media.long().cumsum(dim=1) - 1  # each visual slot's place among its row's visual slots
        mask = view.text | (media & (rank % self.layer.patches < self.tokens))
        record_kept(view, mask)
        return mask


def _all_hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """VisionZip reads the selected layer's input as well as its output (transformers >= 5.25 captures only the
    hidden states the caller selects otherwise)."""
    return args, {**kwargs, "output_hidden_states": True}
