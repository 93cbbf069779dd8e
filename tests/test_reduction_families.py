"""A reduction before the language model on every family, against the unpatched language model fed the reduced
prompt built by hand: the kept tokens' first-layer inputs; their positions (renumbered as a shorter prompt's where
positions are 1D, the full prompt's (t, h, w) columns on multimodal RoPE); Gemma3's token types; Qwen3-VL's deepstack
features of the kept visual tokens. Forward logits under SDPA and eager, a left-padded batch with rows of 1, 0 and 2
images (and video where the family has it), greedy ``generate`` with the cache against a no-cache recomputation
of every step, and ``remove()`` giving back the model bit for bit.

DivPrune is the reduction (its choice is checked against a brute-force greedy), so every step here is independent of
vtexit: the reference chooses the tokens itself and runs transformers' own modules."""

from __future__ import annotations

import pytest
import torch
from reduced_prompt import greedy_by_hand, keep_count
from reference import withdrawn_logits

import vtexit
from vtexit.core.transformers_compat import cache_kwargs, output_cache
from vtexit.testing.tiny_models import FAMILIES, build_tiny

KEEP = 0.3
STEPS = 3


class CapturedPrompt:
    """What the unpatched language model received for a prompt: its kwargs (inputs_embeds, positions, deepstack)."""

    def __init__(self, case, inputs: dict):
        model = case.model
        language_model = model.model.language_model if hasattr(model.model, "language_model") else None
        language_model = language_model or model.model.text_model
        seen = {}
        hook = language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs, use_cache=False)
        finally:
            hook.remove()
        self.language_model = language_model
        self.embeds = seen["inputs_embeds"].detach()
        positions = seen.get("position_ids")
        self.mrope = positions is not None and positions.ndim == 3
        # (3, batch, length) M-RoPE positions (t, h, w): the last three rows (5.25 adds the text row in front).
        self.positions = positions[-3:].detach() if self.mrope else None
        self.visual_pos_masks = seen.get("visual_pos_masks")
        self.deepstack = seen.get("deepstack_visual_embeds")


def choose_by_hand(case, inputs: dict, prompt: CapturedPrompt) -> list[list[int]]:
    """Per row, the kept positions of the prompt: real text, and the visual tokens DivPrune's greedy picks."""
    media = case.media_mask(inputs) & inputs["attention_mask"].bool()
    kept = []
    for b in range(media.shape[0]):
        visual = media[b].nonzero().flatten().tolist()
        features = prompt.embeds[b].double().numpy()
        chosen = greedy_by_hand(features, visual, keep_count(len(visual), KEEP)) if visual else set()
        real = inputs["attention_mask"][b].bool()
        kept.append([i for i in range(media.shape[1]) if real[i] and (not media[b, i] or i in chosen)])
    return kept


class ReducedPrompt:
    """The reduced prompt, left-padded, and the unpatched model's logits on it plus generated tokens (no cache)."""

    def __init__(self, case, inputs: dict, prompt: CapturedPrompt, kept: list[list[int]], groups: dict | None = None):
        """``groups``: {(row, kept position): positions whose inputs (and deepstack rows) it carries the mean of}
        for a method that merges (pooling); every other kept token carries its own."""
        self.case, self.prompt, self.kept = case, prompt, kept
        groups = groups or {}
        batch = len(kept)
        self.length = max(len(k) for k in kept)
        hidden = prompt.embeds.shape[-1]
        self.embeds = prompt.embeds.new_zeros(batch, self.length, hidden)
        self.mask = torch.zeros(batch, self.length, dtype=torch.long)
        self.positions = torch.zeros(3, batch, self.length, dtype=torch.long)
        self.token_types = torch.zeros(batch, self.length, dtype=torch.long)
        self.visual = torch.zeros(batch, self.length, dtype=torch.bool)
        media = case.media_mask(inputs)
        self.next_position = []
        for b, row in enumerate(kept):
            start = self.length - len(row)
            index = torch.tensor(row)
            self.embeds[b, start:] = prompt.embeds[b, index]
            for slot, position in enumerate(row):
                if (b, position) in groups:
                    self.embeds[b, start + slot] = prompt.embeds[b, groups[b, position]].mean(0)
            self.mask[b, start:] = 1
            self.visual[b, start:] = media[b, index]
            if "token_type_ids" in inputs:
                self.token_types[b, start:] = inputs["token_type_ids"][b, index]
            if prompt.mrope:  # the full prompt's columns; new tokens continue after its largest position
                self.positions[:, b, start:] = prompt.positions[:, b, index]
                real = inputs["attention_mask"][b].bool()
                self.next_position.append(int(prompt.positions[:, b, real].max()) + 1)
            else:  # a shorter prompt's positions: 0.. over the kept tokens
                self.positions[:, b, start:] = torch.arange(len(row))
                self.next_position.append(len(row))
        if prompt.deepstack is not None:  # each kept visual token's rows of the full prompt's features
            full = prompt.visual_pos_masks
            rank = full.flatten().long().cumsum(0).view_as(full) - 1
            members = [
                rank[b, groups.get((b, p), [p])] for b, row in enumerate(kept) for p in row if full[b, p]
            ]  # each kept visual token's rows: its own, or its group's
            self.deepstack = [torch.stack([f[m].mean(0) for m in members]) for f in prompt.deepstack]

    @torch.no_grad()
    def logits(self, new_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The unpatched model's logits on the reduced prompt followed by ``new_tokens`` (batch, n), no cache."""
        model, prompt = self.case.model, self.prompt
        embeds, mask, positions = self.embeds, self.mask, self.positions
        token_types, visual = self.token_types, self.visual
        if new_tokens is not None and new_tokens.shape[1]:
            n = new_tokens.shape[1]
            embeds = torch.cat([embeds, model.get_input_embeddings()(new_tokens)], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
            after = torch.tensor(self.next_position).view(1, -1, 1) + torch.arange(n).view(1, 1, -1)
            positions = torch.cat([positions, after.expand(3, -1, -1)], dim=2)
            token_types = torch.cat([token_types, torch.zeros_like(new_tokens)], dim=1)
            visual = torch.cat([visual, torch.zeros_like(new_tokens, dtype=torch.bool)], dim=1)
        if prompt.deepstack is not None:  # Qwen3-VL: the text model takes the deepstack features directly
            hidden = prompt.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                visual_pos_masks=visual,
                deepstack_visual_embeds=self.deepstack,
                use_cache=False,
            ).last_hidden_state
            return model.lm_head(hidden)
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "use_cache": False}
        if prompt.mrope:
            kwargs["position_ids"] = positions
        if self.case.name == "gemma3":
            kwargs["token_type_ids"] = token_types
        return model(**kwargs).logits

    @torch.no_grad()
    def greedy(self, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy tokens and each step's last logits, every step recomputed from the whole reduced prompt."""
        tokens = torch.zeros(self.mask.shape[0], 0, dtype=torch.long)
        step_logits = []
        suppressed = list(self.case.model.generation_config.suppress_tokens or [])  # the tiny vocab's special ids
        for _ in range(steps):
            last = self.logits(tokens)[:, -1]
            step_logits.append(last)
            allowed = last.clone()
            allowed[:, suppressed] = -torch.inf
            tokens = torch.cat([tokens, allowed.argmax(-1, keepdim=True)], dim=1)
        return tokens, step_logits


def greedy_case(name: str, attn: str):
    case = build_tiny(name, num_layers=4, attn_implementation=attn)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


def batches(case) -> list[dict]:
    found = [case.inputs([1, 0, 2], text_len=[5, 7, 3])]
    if case.supports_video:
        found.append(case.inputs([0, 1], videos_per_row=[1, 0], text_len=[4, 6]))
    return found


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_reduction_equals_the_unpatched_model_on_the_reduced_prompt(name, attn):
    case = greedy_case(name, attn)
    model = case.model
    for inputs in batches(case):
        before = model(**inputs, use_cache=False).logits
        prompt = CapturedPrompt(case, inputs)
        kept = choose_by_hand(case, inputs, prompt)
        reduced = ReducedPrompt(case, inputs, prompt, kept)
        expected = reduced.logits()
        expected_tokens, expected_steps = reduced.greedy(STEPS)
        handle = vtexit.divprune(model, keep=KEEP)
        try:
            logits = model(**inputs, use_cache=False).logits
            layout = handle.last_layout
            generate = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True)
            result = model.generate(**inputs, **generate, return_dict_in_generate=True)
        finally:
            handle.remove()
        for b, row in enumerate(kept):  # the same tokens kept, in order
            assert layout.index[b][layout.valid[b]].tolist() == row
        torch.testing.assert_close(logits[layout.valid], expected[reduced.mask.bool()], atol=2e-5, rtol=1e-4)
        assert result.sequences[:, inputs["input_ids"].shape[1] :].tolist() == expected_tokens.tolist()
        for step, reference in zip(result.logits, expected_steps, strict=True):
            torch.testing.assert_close(step, reference, atol=2e-5, rtol=1e-4)
        assert torch.equal(model(**inputs, use_cache=False).logits, before)


@pytest.mark.parametrize(
    "name, with_mask",
    [("qwen2_vl", False), ("qwen3_vl", False), ("gemma3", True), ("gemma3", False), ("idefics3", True)],
)
@torch.no_grad()
def test_decode_steps_called_by_hand_continue_the_full_prompts_positions(name, with_mask):
    """A user's loop of forward calls without ``position_ids`` (transformers numbers new tokens itself, from the
    2D mask when given, else from the cache): the no-cache recomputation is the reference. Without a mask, one
    unpadded row. (With a mask, the Qwen-VL families' own numbering fails in transformers 5.25, unpatched too.)"""
    case = greedy_case(name, "sdpa")
    model = case.model
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3]) if with_mask else case.inputs([2], text_len=[5])
    prompt = CapturedPrompt(case, inputs)
    reduced = ReducedPrompt(case, inputs, prompt, choose_by_hand(case, inputs, prompt))
    expected_tokens, expected_steps = reduced.greedy(STEPS)
    mask = inputs["attention_mask"]
    call = dict(inputs) if with_mask else {k: v for k, v in inputs.items() if k != "attention_mask"}
    with vtexit.divprune(model, keep=KEEP):
        out = model(**call, use_cache=True)
        cache, logits, tokens = output_cache(out), [out.logits[:, -1]], []
        for _ in range(STEPS - 1):
            allowed = logits[-1].clone()
            allowed[:, list(model.generation_config.suppress_tokens)] = -torch.inf
            tokens.append(allowed.argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = {"attention_mask": mask} if with_mask else {}
            out = model(input_ids=tokens[-1], **cache_kwargs(model, cache), use_cache=True, **step)
            logits.append(out.logits[:, -1])
    assert torch.cat(tokens, dim=1).tolist() == expected_tokens[:, : STEPS - 1].tolist()
    for got, reference in zip(logits, expected_steps, strict=True):
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"])
@torch.no_grad()
def test_reduction_on_a_static_cache_equals_the_no_cache_recomputation(name):
    """Every layer's static buffers hold the reduced prompt; decode steps continue the full prompt's positions."""
    case = greedy_case(name, "sdpa")
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3])
    prompt = CapturedPrompt(case, inputs)
    expected_tokens, expected_steps = ReducedPrompt(case, inputs, prompt, choose_by_hand(case, inputs, prompt)).greedy(
        STEPS
    )
    generate = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True)
    with vtexit.divprune(case.model, keep=KEEP):
        result = case.model.generate(**inputs, **generate, return_dict_in_generate=True, cache_implementation="static")
    assert result.sequences[:, inputs["input_ids"].shape[1] :].tolist() == expected_tokens.tolist()
    for step, reference in zip(result.logits, expected_steps, strict=True):
        torch.testing.assert_close(step, reference, atol=2e-5, rtol=1e-4)


def pool_blocks_by_hand(case, inputs: dict, stride: int) -> tuple[list[list[int]], dict]:
    """Qwen-VL images: each image's merged grid (``image_grid_thw`` / 2 per side, its tokens consecutive and
    row-major, images in order) cut into stride x stride blocks (smaller at odd edges). Per row the kept positions
    (text, and each block's top-left token) and each leader's block."""
    merge = case.model.config.vision_config.spatial_merge_size
    sizes = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    media = case.media_mask(inputs)
    kept, groups = [], {}
    for b in range(media.shape[0]):
        real = inputs["attention_mask"][b].bool()
        visual = media[b].nonzero().flatten().tolist()
        row_kept = [i for i in range(media.shape[1]) if real[i] and not media[b, i]]
        while visual:
            height, width = sizes.pop(0)
            image, visual = visual[: height * width], visual[height * width :]
            for top in range(0, height, stride):
                for left in range(0, width, stride):
                    block = [
                        image[r * width + c]
                        for r in range(top, min(top + stride, height))
                        for c in range(left, min(left + stride, width))
                    ]
                    row_kept.append(block[0])
                    groups[b, block[0]] = block
        kept.append(sorted(row_kept))
    return kept, groups


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_pooling_on_multimodal_rope_equals_the_pooled_prompt_by_hand(name):
    """Each block's mean at its top-left token's (t, h, w) position; on Qwen3-VL the block's deepstack rows are
    averaged the same way."""
    case = greedy_case(name, "sdpa")
    model = case.model
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3])
    prompt = CapturedPrompt(case, inputs)
    kept, groups = pool_blocks_by_hand(case, inputs, stride=2)
    reduced = ReducedPrompt(case, inputs, prompt, kept, groups)
    expected = reduced.logits()
    expected_tokens, expected_steps = reduced.greedy(STEPS)
    generate = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True)
    with vtexit.pool(model, stride=2) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
        result = model.generate(**inputs, **generate, return_dict_in_generate=True)
    for b, row in enumerate(kept):
        assert layout.index[b][layout.valid[b]].tolist() == row
    torch.testing.assert_close(logits[layout.valid], expected[reduced.mask.bool()], atol=2e-5, rtol=1e-4)
    assert result.sequences[:, inputs["input_ids"].shape[1] :].tolist() == expected_tokens.tolist()
    for step, reference in zip(result.logits, expected_steps, strict=True):
        torch.testing.assert_close(step, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["internvl", "gemma3", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_a_hybrid_equals_withdrawal_run_by_hand_on_the_reduced_prompt(name):
    """DivPrune before the language model, then VTW at the first layer the family allows: against the unpatched
    model's layer inputs on the reduced prompt built by hand, with the layers from K on run by hand on each row's text
    tokens (tests/reference.py)."""
    case = greedy_case(name, "sdpa")
    model = case.model
    inputs = case.inputs([1, 0, 2], text_len=[5, 7, 3])
    prompt = CapturedPrompt(case, inputs)
    reduced = ReducedPrompt(case, inputs, prompt, choose_by_hand(case, inputs, prompt))
    seen = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(((a[0] if a else k["hidden_states"]).clone(), dict(k))), with_kwargs=True
        )
        for layer in prompt.language_model.layers
    ]
    try:
        reduced.logits()
    finally:
        for hook in hooks:
            hook.remove()
    layer = vtexit.valid_layer_range(model)[0]
    config = {
        "method": "hybrid",
        "pre": {"method": "divprune", "keep": KEEP},
        "then": {"method": "vtw", "layer": layer},
    }
    with vtexit.apply(model, config) as handle:
        logits = model(**inputs, use_cache=False).logits
        layout = handle.last_layout
    for b in range(len(reduced.kept)):
        text = (reduced.mask[b].bool() & ~reduced.visual[b]).nonzero().flatten()
        expected = withdrawn_logits(model, seen, b, text, layer)
        torch.testing.assert_close(logits[b][layout.valid[b]], expected, atol=2e-5, rtol=1e-4)
