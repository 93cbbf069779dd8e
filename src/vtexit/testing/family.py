"""What one tiny family is made of; each module under `families/` declares one of these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

from vtexit.testing.config_kwargs import Overrides
from vtexit.testing.input_spec import InputSpec
from vtexit.testing.vocab import Vocab

__all__ = ["ConfigBuilder", "TinyFamily"]

# (num_layers, vocab, text overrides, vision overrides, top-level overrides) -> config
ConfigBuilder = Callable[[int, Vocab, Overrides, Overrides, Overrides], PretrainedConfig]


@dataclass(frozen=True)
class TinyFamily:
    """A family's config builder, real model class and input builder, kept together."""

    name: str
    build_config: ConfigBuilder
    model_class: type[PreTrainedModel]
    input_spec: type[InputSpec]
