"""What one patched call keeps while it runs, what a prefill leaves for the decode steps of its cache, and the
cost records built from them when read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtexit.core.costs import LayerCost, RunCost, counts
from vtexit.core.layout import Layout
from vtexit.core.transformers_compat import Cache


@dataclass
class Stage:
    """The layout after one compaction event of a prefill."""

    layout: Layout
    position_shift: torch.Tensor | None = None  # (batch, 1) positions removed by renumbering


@dataclass
class PrefillRecord:
    """What decode steps need from the prefill that filled a cache."""

    prompt_length: int
    media: torch.Tensor  # (batch, prompt length) bool, True at media tokens
    full_valid: torch.Tensor  # (batch, prompt length) bool, False at the caller's padding
    stage_of_layer: list[int]  # per layer: index into `stages` (-1 = full sequence)
    stages: list[Stage]
    cost: RunCost
    # Speculative decoding verifies draft tokens in the call that fills the cache: the last ``draft_length`` slots of
    # the "prompt" are drafts (text, kept by every layer), which the cache may drop again (see ``without_last``).
    draft_length: int = 0

    def without_last(self, count: int) -> PrefillRecord:
        """The record after the cache dropped the last ``count`` draft tokens from every layer (rejected drafts)."""
        if not 0 < count <= self.draft_length:
            raise ValueError(
                f"the cache lost {count} positions of the prompt that filled it under vtexit (it may drop only the "
                f"{self.draft_length} draft tokens verified with it): a cropped prompt cannot be continued"
            )
        stages = [
            Stage(Layout(s.layout.index[:, :-count], s.layout.valid[:, :-count], s.layout.padded), s.position_shift)
            for s in self.stages
        ]
        return PrefillRecord(
            prompt_length=self.prompt_length - count,
            media=self.media[:, :-count],
            full_valid=self.full_valid[:, :-count],
            stage_of_layer=self.stage_of_layer,
            stages=stages,
            cost=self.cost,
            draft_length=self.draft_length - count,
        )

    @property
    def full_tokens(self) -> torch.Tensor:
        """(batch,) prompt tokens, padding excluded (computed when a cost record is read, not in the prefill)."""
        return self.full_valid.sum(1)

    @property
    def compacted(self) -> bool:
        return any(s >= 0 for s in self.stage_of_layer)

    @property
    def reduces_prompt(self) -> bool:
        """Layer 0 was compacted too (a reduction before the language model): no layer holds the whole prompt."""
        return self.stage_of_layer[0] >= 0

    @property
    def dropped_before_layer0(self) -> int:
        """Prompt slots layer 0's cache does not hold (0 unless the prompt was reduced): what the past length
        transformers reads from layer 0 is short of the full prompt's."""
        stage = self.stage_of_layer[0]
        return 0 if stage < 0 else self.prompt_length - self.stages[stage].layout.length


@dataclass
class CallState:
    """The state of one forward call of a patched model (one per thread)."""

    mode: str  # "prefill" | "decode"
    padding: torch.Tensor | None  # the caller's 2D attention mask
    past_length: int = 0
    query_length: int = 0
    media: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None  # (batch, prompt length) bidirectional media blocks, or None
    layout: Layout | None = None
    full_valid: torch.Tensor | None = None  # (batch, prompt length) the caller's padding as bool
    stage: int = -1
    stages: list[Stage] = field(default_factory=list)
    stage_of_layer: list[int] = field(default_factory=list)
    cache: Cache | None = None
    static_prefill: bool = False  # a prefill filling a static cache (its compacted layers are sized)
    record: PrefillRecord | None = None
    static: Any = None  # the StaticPlan of a decode call on a static cache
    # In-layer methods: layer -> (head fraction, FFN fraction, visual keys), each None where not recorded.
    fractions: dict[int, tuple] = field(default_factory=dict)
    grid_inputs: dict = field(default_factory=dict)  # the core kwargs the family's visual grid is computed from
    use_cache: bool | None = None  # as the core was called (None: not said)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    key_states: dict[int, torch.Tensor] = field(default_factory=dict)
    policy_state: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)  # the policy's prefill checks, as read
    # A schedule planned before the first layer (Policy.withdraw_media_at): event layer -> (layout after it, the
    # slot of the previous layout each new slot comes from). None: the policy is asked at each layer.
    planned: dict[int, tuple[Layout, torch.Tensor]] | None = None
    renumbered: Layout | None = None  # the layout after the last event that renumbered positions (None: none did)
    traced: bool = False  # started while tracing (torch.compile of the whole model): no host reads, no locks
    traced_media_count: int = 0  # a traced prefill's visual tokens, from the pixel inputs' shapes
    draft_length: int = 0  # speculative decoding: draft tokens after the prompt in this prefill (policies see none)
    # Qwen3-VL: the text model's (visual_pos_masks, deepstack_visual_embeds) of this prefill, and after a reduction
    # before layer 0, each feature list entry's rows for the kept slots (id of the entry -> (batch, slots, dim)).
    deepstack: tuple | None = None
    deepstack_rows: dict = field(default_factory=dict)


def decode_key_padding(call: CallState, stage: int) -> torch.Tensor:
    """Keys of a compacted layer in a decode call: the prompt positions it kept at prefill, then every token since."""
    key = ("key padding", stage)
    if key not in call.memo:
        call.memo[key] = key_padding(call.record, stage, call.padding, call.past_length, call.query_length)
    return call.memo[key]


def key_padding(record: PrefillRecord, stage: int, padding, past_length: int, query_length: int) -> torch.Tensor:
    prompt_valid = record.stages[stage].layout.valid
    if padding is not None:
        tail = padding[:, record.prompt_length :].to(device=prompt_valid.device, dtype=torch.bool)
    else:
        new_columns = past_length + query_length - record.prompt_length
        tail = torch.ones(prompt_valid.shape[0], new_columns, dtype=torch.bool, device=prompt_valid.device)
    return torch.cat([prompt_valid, tail], dim=1)


def with_fractions(layers: list[LayerCost], fractions: dict) -> list[LayerCost]:
    for layer_idx, (heads, ffn, visual_keys) in fractions.items():
        if heads is not None:
            layers[layer_idx].head_fraction = heads
        if ffn is not None:
            layers[layer_idx].ffn_fraction = ffn
        if visual_keys is not None:
            layers[layer_idx].visual_keys = visual_keys
    return layers


@dataclass
class PrefillCostInputs:
    """What a prefill's cost records are built from when read (no reference to the cache or activations)."""

    full_valid: torch.Tensor
    media: torch.Tensor
    stages: list[Stage]
    stage_of_layer: list[int]
    fractions: dict

    def layers(self) -> list[LayerCost]:
        """Per layer: the visual/text slots of the layout it ran on (keys = queries in a prefill)."""
        full = counts(self.full_valid, self.media)
        per_stage = [counts(stage.layout.valid, self.media.gather(1, stage.layout.index)) for stage in self.stages]
        layers = []
        for stage in self.stage_of_layer:
            visual, text = full if stage < 0 else per_stage[stage]
            layers.append(LayerCost(visual_queries=visual, text_queries=text, keys=visual + text))
        return with_fractions(layers, self.fractions)


@dataclass
class DecodeCostInputs:
    record: PrefillRecord
    padding: torch.Tensor | None
    past_length: int
    query_length: int
    fractions: dict
    static_keys: tuple[int, ...] | None = None  # a static cache: each layer computes all its slots (masked)

    def layers(self) -> list[LayerCost]:
        """Per layer: the new (text) tokens, and the keys each layer attended to."""
        queries = torch.full_like(self.record.full_tokens, self.query_length)
        no_visual = torch.zeros_like(queries)
        if self.static_keys is not None:
            layers = [LayerCost(no_visual, queries, torch.full_like(queries, n)) for n in self.static_keys]
            return with_fractions(layers, self.fractions)
        if self.padding is not None:
            full_keys = self.padding.sum(1).to(queries.device)
        else:
            full_keys = queries + self.past_length
        per_stage = [
            key_padding(self.record, s, self.padding, self.past_length, self.query_length).sum(1)
            for s in range(len(self.record.stages))
        ]
        layers = [
            LayerCost(no_visual, queries, full_keys if stage < 0 else per_stage[stage])
            for stage in self.record.stage_of_layer
        ]
        return with_fractions(layers, self.fractions)
