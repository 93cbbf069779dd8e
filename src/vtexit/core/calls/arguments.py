"""Reading and rewriting the arguments a hooked module was called with."""

from __future__ import annotations

import torch


def sequence_length(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    """Tokens in this call (from ``input_ids``, else ``inputs_embeds``)."""
    tensor = input_ids if input_ids is not None else inputs_embeds
    return int(tensor.shape[1])


def split_hidden(args: tuple, kwargs: dict):
    """A decoder layer's hidden states, its other positional arguments, and whether the states came as a keyword."""
    if args:
        return args[0], args[1:], False
    return kwargs["hidden_states"], (), True


def join_hidden(hidden, rest, kwargs, in_kwargs):
    """The (args, kwargs) a pre-hook returns to call a decoder layer with new hidden states."""
    if in_kwargs:
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return rest, kwargs
    return (hidden, *rest), kwargs
