"""YOPO's ``window`` and ``heads`` on Gemma3 against an independent masked simulation.

Gemma3's text model alternates sliding-window and full-attention layers, and an image's tokens attend to each other
both ways (its mask from ``token_type_ids``). The reference here runs each layer's attention by hand (q/k norms,
rotary, ``query_pre_attn_scalar`` scaling, eager softmax) under the very mask the model passes that layer, cut by hand
with YOPO's rules: under ``window`` a visual query keeps, of those keys, the visual keys of its w x w neighbourhood on
its image (found from the model's own vision features, tests/grid_reference.py) and the text keys; in a pruned head
text queries lose the visual keys (renormalised, or zeroed after the softmax) and visual rows are zeroed. The tiny
model's sliding window is 8 slots and its images 4 x 4 tokens, so a 5 x 5 window reaches keys the sliding layers cut.
Left-padded rows hold 1, 0 and 2 images; cached greedy generation is checked against a no-cache recomputation (the
sliding layers' caches keep only their last keys, so decode steps with pruned heads read those keys' media flags).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from reference import greedy_no_cache
from yopo_reference import _mlp, hand_grid

import vtexit
from vtexit.core.families import family_for
from vtexit.testing.tiny_models import build_tiny

LAYERS = 4
NEW_TOKENS = 4
_CASES: dict[str, object] = {}


def _case(attn: str):
    if attn not in _CASES:
        case = build_tiny("gemma3", attn_implementation=attn, num_layers=LAYERS)
        case.model.generation_config.eos_token_id = None
        _CASES[attn] = case
    return _CASES[attn]


def _inputs(case) -> dict:
    return case.inputs([1, 0, 2], text_len=[5, 7, 3])


def _active(case) -> torch.Tensor:
    """A different pruned set per layer: none in layer 0, every head in layer 3 (visual rows compute nothing)."""
    heads = case.model.config.get_text_config().num_attention_heads
    active = torch.rand(LAYERS, heads, generator=torch.Generator().manual_seed(1)) < 0.5
    active[0] = True
    active[1, 0], active[1, 1] = True, False  # a sliding and a full layer with a mixed mask
    active[2, 0], active[2, 1] = False, True
    active[3] = False
    return active


class _Context:
    media: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    valid: torch.Tensor


def simulate(model, *, window=None, active=None, pruned_text="renormalise", neurons=None):
    """A deep copy of ``model`` whose attention (and with ``neurons``, MLP) forwards are the reference."""
    sim = copy.deepcopy(model)
    context = _Context()

    def set_context(module, args, kwargs):
        ids = kwargs["input_ids"]
        context.media, context.frame, context.row, context.col = hand_grid(sim, ids.cpu(), kwargs)
        context.valid = kwargs["attention_mask"].bool().cpu()

    sim.register_forward_pre_hook(set_context, with_kwargs=True)
    for i, layer in enumerate(family_for(sim).resolve(sim).layers):
        rule = None if active is None else active[i]
        layer.self_attn.forward = types.MethodType(_attention(context, window, rule, pruned_text), layer.self_attn)
        if neurons is not None:
            layer.mlp.forward = types.MethodType(_mlp(context, neurons), layer.mlp)
    return sim


def _attention(context: _Context, window, active, pruned_text):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        assert attention_mask is not None, "the padded batch always has the model's 4D mask"
        rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = rotate(query, key, *position_embeddings)
        heads = query.shape[1]
        key, value = (t.repeat_interleave(heads // key.shape[1], 1) for t in (key, value))
        # The model's own mask of this layer (bool under SDPA, additive under eager).
        mask = attention_mask[..., :length].cpu()
        model_mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        media_q, media_k = context.media.view(batch, 1, length, 1), context.media.view(batch, 1, 1, length)
        allowed = model_mask.expand(batch, heads, length, length).clone()
        if window is not None:
            radius = (window - 1) // 2
            near = (
                (context.frame.unsqueeze(2) == context.frame.unsqueeze(1))
                & ((context.row.unsqueeze(2) - context.row.unsqueeze(1)).abs() <= radius)
                & ((context.col.unsqueeze(2) - context.col.unsqueeze(1)).abs() <= radius)
            ).unsqueeze(1)
            allowed &= ~media_q | near | ~media_k
        keep = torch.ones_like(allowed)
        if active is not None:
            hide = ~active.view(1, -1, 1, 1) & ~media_q & media_k
            if pruned_text == "renormalise":
                allowed &= ~hide
            else:
                keep = ~hide
        pad_q = ~context.valid.view(batch, 1, length, 1)
        allowed |= pad_q & torch.eye(length, dtype=torch.bool)  # pad queries: themselves (never read)
        scores = (query @ key.transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) * keep) @ value
        if active is not None:
            out = out.masked_fill(media_q & ~active.view(1, -1, 1, 1), 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None

    return forward


def _strategies(case) -> dict[str, dict]:
    active = _active(case)
    ffn = case.model.config.get_text_config().intermediate_size
    return {
        "window": dict(window=3),
        "window5": dict(window=5),
        "heads": dict(heads=active),
        "heads-zero": dict(heads=active, pruned_text="zero"),
        "all": dict(window=5, heads=active, ffn_ratio=2, _neurons=ffn // 2),
        "window5-dense": dict(window=5, dense_below=10**9),
        "heads-dense": dict(heads=active, dense_below=10**9),
        "heads-zero-dense": dict(heads=active, pruned_text="zero", dense_below=10**9),
        "all-dense": dict(window=5, heads=active, ffn_ratio=2, _neurons=ffn // 2, dense_below=10**9),
        "window5-flex": dict(window=5, window_kernel="flex"),
    }


def _check(case, settings: dict, name: str) -> None:
    inputs = _inputs(case)
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    sim = simulate(
        case.model,
        window=settings.get("window"),
        active=settings.get("heads"),
        pruned_text=settings.get("pruned_text", "renormalise"),
        neurons=settings.get("_neurons"),
    )
    config = vtexit.YOPOConfig(**{k: v for k, v in settings.items() if not k.startswith("_")})
    with torch.no_grad():
        expected = sim(**inputs, use_cache=False).logits
        with vtexit.yopo(case.model, config):
            logits = case.model(**inputs).logits
            generated = case.model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids
            )
        reference = greedy_no_cache(sim, inputs, NEW_TOKENS, suppress=media_ids)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=3e-5, rtol=1e-4, msg=name)
    assert torch.equal(generated, reference), name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reference_without_rules_is_the_model(attn):
    """The hand-run attention under the model's own masks is Gemma3's attention (so the rules are all it adds), and
    those masks are more than causal: the rows of an image read its later tokens, sliding layers cut old keys."""
    case = _case(attn)
    inputs = _inputs(case)
    with torch.no_grad():
        want = case.model(**inputs).logits
        got = simulate(case.model)(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=3e-5, rtol=1e-4)
    seen = []
    hook = case.model.model.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True
    )
    with torch.no_grad():
        case.model(**inputs)
    hook.remove()
    mask = seen[0] if seen[0].dtype == torch.bool else seen[0] > torch.finfo(seen[0].dtype).min / 2
    media = case.media_mask(inputs)
    first = int(media[0].nonzero()[0])
    assert mask[0, 0, first, first + 1]  # an image token reads the next one
    assert not mask[0, 0, -1, first]  # the sliding window (8) drops the image for the last text token


MATRIX = [("sdpa", s) for s in ("window", "window5", "heads", "heads-zero", "all")]
MATRIX += [("sdpa", s) for s in ("window5-dense", "heads-dense", "all-dense", "window5-flex")]
MATRIX += [("eager", s) for s in ("all", "heads-zero", "heads-zero-dense")]


@pytest.mark.parametrize(("attn", "name"), MATRIX, ids=["-".join(m) for m in MATRIX])
def test_yopo_on_gemma3_matches_masked_simulation(attn, name):
    case = _case(attn)
    _check(case, _strategies(case)[name], name)


def test_remove_restores_the_model_bit_for_bit():
    case = _case("sdpa")
    inputs = _inputs(case)
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    settings = {k: v for k, v in _strategies(case)["all"].items() if not k.startswith("_")}
    with torch.no_grad():
        before = case.model(**inputs).logits
        handle = vtexit.yopo(case.model, vtexit.YOPOConfig(**settings))
        patched = case.model(**inputs).logits
        handle.remove()
        after = case.model(**inputs).logits
    assert not torch.equal(patched[:, -1], before[:, -1])
    assert torch.equal(after, before)
    assert all(torch.equal(v, state[k]) for k, v in case.model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in case.model.modules())


def test_logit_softcapping_is_refused():
    """A Gemma3 attention with ``attn_logit_softcapping`` set is refused with a clear error (YOPO does not cap)."""
    case = build_tiny("gemma3", num_layers=2)
    for layer in case.model.model.language_model.layers:
        layer.self_attn.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        vtexit.yopo(case.model, vtexit.YOPOConfig(window=3))
