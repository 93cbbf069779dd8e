"""YOPO on the engine contract: layer drop is a withdrawal event; the other strategies replace the attention and
MLP forwards of the layers before it (after it there are no visual tokens left to prune)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from vtexit.core.families import FamilySpec
from vtexit.core.layout import Layout
from vtexit.core.policy import Policy, PrefillView
from vtexit.methods.yopo.attention import HeadPlan, YOPOAttention, check_attention
from vtexit.methods.yopo.execution import split_checks
from vtexit.methods.yopo.mlp import YOPOMLP, check_mlp

if TYPE_CHECKING:
    from vtexit.core.engine import ScheduleEngine
    from vtexit.methods.yopo.config import YOPOConfig


class YOPOPolicy(Policy):
    def __init__(
        self,
        config: YOPOConfig,
        layers: list[nn.Module],
        family: FamilySpec,
        min_layer: int,
        layer_drop: int | None,
    ):
        self.config = config
        self.layer_drop = layer_drop
        self.family = family
        # Without a drop, one hooked layer still lets the engine see the cache (decode needs the prompt's media).
        self.event_layers = frozenset({layer_drop if layer_drop is not None else min(min_layer, len(layers) - 1)})
        self.withdraw_media_at = layer_drop  # used by the engine only when no forward is replaced
        self.attention_modules: dict[int, nn.Module] = {}
        self.mlp_modules: dict[int, nn.Module] = {}
        heads = config.head_mask()
        self.head_plans: dict[int, HeadPlan] = {}
        # Only the layers before the drop hold visual tokens to prune.
        for i in range(len(layers) if layer_drop is None else layer_drop):
            attention = getattr(layers[i], family.attention)
            if config.window is not None or heads is not None:
                check_attention(attention, "window / heads")
                num_heads = attention.q_proj.out_features // attention.head_dim
                active = heads.active[i] if heads is not None else torch.ones(num_heads, dtype=torch.bool)
                plan = HeadPlan.of(active, attention.k_proj.out_features // attention.head_dim)
                if config.window is not None or plan.pruned:
                    self.attention_modules[i] = attention
                    self.head_plans[i] = plan
            if config.ffn_ratio is not None:
                mlp = layers[i].mlp
                check_mlp(mlp)
                self.mlp_modules[i] = mlp
        self.neurons = None
        if self.mlp_modules:
            size = next(iter(self.mlp_modules.values())).down_proj.in_features
            self.neurons = max(1, round(size / float(config.ffn_ratio)))

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer_idx != self.layer_drop:
            return None
        return view.text

    def prefill_checks(self, media: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        if not (self.attention_modules or self.mlp_modules):
            return {}
        return split_checks(media, self.config.dense_below)

    def replacements(self, engine: ScheduleEngine) -> dict[nn.Module, Callable]:
        if self.family.media_blocks is not None and self.attention_modules:
            raise ValueError(
                f"window / heads are not supported for {self.family.name}: its media blocks attend both ways"
            )
        config = self.config
        attention = YOPOAttention(
            engine, self.head_plans, config.window, config.pruned_text, config.window_kernel, config.dense_below
        )
        out: dict[nn.Module, Callable] = {module: attention.forward for module in self.attention_modules.values()}
        if self.mlp_modules:
            mlp = YOPOMLP(engine, self.neurons, config.dense_below)
            out.update({module: partial(mlp.forward, i) for i, module in self.mlp_modules.items()})
        return out
