"""YOPO on the engine contract: layer drop is a withdrawal event; the other strategies replace the attention and
MLP forwards of the layers before it (after it there are no visual tokens left to prune)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.layout import Layout
from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.yopo.attention import HeadPlan, YOPOAttention, check_attention
from vtexit.methods.yopo.execution import split_checks
from vtexit.methods.yopo.heads import HeadMask
from vtexit.methods.yopo.mlp import YOPOMLP, check_mlp

if TYPE_CHECKING:
    from vtexit.core.call_access import CallAccess


@dataclass(frozen=True)
class InLayerSettings:
    """What YOPO's in-layer strategies run with (the settings of :class:`~vtexit.methods.yopo.config.YOPOConfig`,
    checked there; ``heads`` as a mask)."""

    window: int | None = None
    heads: HeadMask | None = None
    ffn_ratio: float | None = None
    pruned_text: str = "renormalise"
    window_kernel: str = "auto"
    dense_below: int | None = None


class YOPOPolicy(Policy):
    def __init__(
        self,
        settings: InLayerSettings,
        layers: list[nn.Module],
        family: FamilySpec,
        min_layer: int,
        layer_drop: int | None,
    ):
        self.settings = settings
        self.layer_drop = layer_drop
        self.family = family
        # Without a drop, one hooked layer still lets the engine see the cache (decode needs the prompt's media).
        self.event_layers = frozenset({layer_drop if layer_drop is not None else min(min_layer, len(layers) - 1)})
        self.withdraw_media_at = layer_drop  # used by the engine only when no forward is replaced
        self.attention_modules: dict[int, nn.Module] = {}
        self.mlp_modules: dict[int, nn.Module] = {}
        heads = settings.heads
        self.head_plans: dict[int, HeadPlan] = {}
        # Only the layers before the drop hold visual tokens to prune.
        for i in range(len(layers) if layer_drop is None else layer_drop):
            attention = getattr(layers[i], family.attention)
            if settings.window is not None or heads is not None:
                check_attention(attention, "window / heads")
                num_heads = attention.q_proj.out_features // attention.head_dim
                active = heads.active[i] if heads is not None else torch.ones(num_heads, dtype=torch.bool)
                plan = HeadPlan.of(active, attention.k_proj.out_features // attention.head_dim)
                if settings.window is not None or plan.pruned:
                    self.attention_modules[i] = attention
                    self.head_plans[i] = plan
            if settings.ffn_ratio is not None:
                mlp = layers[i].mlp
                check_mlp(mlp)
                self.mlp_modules[i] = mlp
        self.neurons = None
        if self.mlp_modules:
            size = next(iter(self.mlp_modules.values())).down_proj.in_features
            self.neurons = max(1, round(size / float(settings.ffn_ratio)))

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer_drop:
            return None
        return view.text

    def prefill_checks(self, media: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        if not (self.attention_modules or self.mlp_modules):
            return {}
        return split_checks(media, self.settings.dense_below)

    def replacements(self, engine: CallAccess) -> dict[nn.Module, Callable]:
        settings = self.settings
        attention = YOPOAttention(
            engine, self.head_plans, settings.window, settings.pruned_text, settings.window_kernel, settings.dense_below
        )
        out: dict[nn.Module, Callable] = {module: attention.forward for module in self.attention_modules.values()}
        if self.mlp_modules:
            mlp = YOPOMLP(engine, self.neurons, settings.dense_below)
            out.update({module: partial(mlp.forward, i) for i, module in self.mlp_modules.items()})
        return out
