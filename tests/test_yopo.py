"""YOPO against an independent masked simulation (tests/yopo_reference.py): dense eager attention with hand-built
per-head masks and zeroed neurons, on a padded batch whose rows hold 1, 0 and 2 images; logits of the prefill and
cached greedy generation against a no-cache recomputation of the simulation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import family_batch
from reference import greedy_no_cache
from yopo_reference import hand_grid, simulate

import vtexit
from vtexit.core.families import family_for
from vtexit.core.flops import DecoderShape, run_flops
from vtexit.methods.yopo.rows import split_rows
from vtexit.testing.tiny_models import build_tiny

NEW_TOKENS = 4
LAYERS = 4


def _active(case, seed: int = 0) -> torch.Tensor:
    """A head mask with a different pruned set per layer (layers 0-1 keep every head, as calibrated masks do)."""
    heads = case.model.config.get_text_config().num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(LAYERS, heads, generator=gen) < 0.5
    active[:2] = True
    active[3, :] = False  # a layer where visual rows compute no attention at all
    return active


def _strategies(case) -> dict[str, dict]:
    active = _active(case)
    ffn = case.model.config.get_text_config().intermediate_size
    return {
        "window": dict(window=3),
        "window5": dict(window=5),
        "heads": dict(heads=active),
        "heads-zero": dict(heads=active, pruned_text="zero"),
        "ffn": dict(ffn_ratio=2, _neurons=ffn // 2),
        "drop": dict(layer_drop=2),
        "all": dict(window=3, heads=active, layer_drop=3, ffn_ratio=3, _neurons=round(ffn / 3)),
        # The window as one compiled FlexAttention call (the CUDA default) instead of tiles of SDPA.
        "window-flex": dict(window=3, window_kernel="flex"),
        "window5-flex": dict(window=5, window_kernel="flex"),
        # Dense execution (what a small prefill on CUDA runs): full rows, the rules as masks.
        "window-dense": dict(window=3, dense_below=10**9),
        "heads-dense": dict(heads=active, dense_below=10**9),
        "heads-zero-dense": dict(heads=active, pruned_text="zero", dense_below=10**9),
        "ffn-dense": dict(ffn_ratio=2, _neurons=ffn // 2, dense_below=10**9),
        "all-dense": dict(
            window=3, heads=active, layer_drop=3, ffn_ratio=3, _neurons=round(ffn / 3), dense_below=10**9
        ),
        "all-flex": dict(
            window=3, heads=active, layer_drop=3, ffn_ratio=3, _neurons=round(ffn / 3), window_kernel="flex"
        ),
    }


def _sim(case, settings):
    return simulate(
        case.model,
        window=settings.get("window"),
        active=settings.get("heads"),
        layer_drop=settings.get("layer_drop"),
        neurons=settings.get("_neurons"),
        pruned_text=settings.get("pruned_text", "renormalise"),
    )


def _config(settings) -> vtexit.YOPOConfig:
    return vtexit.YOPOConfig(**{k: v for k, v in settings.items() if not k.startswith("_")})


_CASES: dict[tuple[str, str], object] = {}


def _case(family: str, attn: str):
    if (family, attn) not in _CASES:
        if family == "llava-11x11":  # images larger than one 8 x 8 tile of the windowed attention, partial tiles
            case = build_tiny(
                "llava",
                attn_implementation=attn,
                num_layers=LAYERS,
                image_seq_length=121,
                vision_config={"image_size": 44, "patch_size": 4},
            )
        else:
            case = build_tiny(family, attn_implementation=attn, num_layers=LAYERS)
        case.model.generation_config.eos_token_id = None
        _CASES[family, attn] = case
    return _CASES[family, attn]


# Every strategy on the two grid layouts under SDPA; the combination and the public semantics under eager too.
MATRIX = [
    (f, "sdpa", s) for f in ("llava", "qwen2_vl") for s in ("window", "heads", "heads-zero", "ffn", "drop", "all")
]
MATRIX += [(f, "eager", s) for f in ("llava", "qwen2_vl") for s in ("heads-zero", "all")]
MATRIX += [("qwen2_5_vl", "sdpa", s) for s in ("window", "all")]
MATRIX += [("llava-11x11", "sdpa", s) for s in ("window5", "all")]
MATRIX += [("llava", "sdpa", "window-flex"), ("qwen2_vl", "sdpa", "all-flex"), ("llava-11x11", "sdpa", "window5-flex")]
DENSE = ("window-dense", "heads-dense", "ffn-dense", "all-dense")
MATRIX += [(f, "sdpa", s) for f in ("llava", "qwen2_vl") for s in DENSE]
MATRIX += [("llava", "eager", "heads-zero-dense"), ("llava-11x11", "sdpa", "all-dense")]


def _check(case, settings, name, inputs=None):
    inputs = family_batch(case) if inputs is None else inputs
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    sim = _sim(case, settings)
    with torch.no_grad():
        expected = sim(**inputs, use_cache=False).logits
        with vtexit.yopo(case.model, _config(settings)) as handle:
            logits = case.model(**inputs).logits
            layout = handle.last_layout
            generated = case.model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=media_ids
            )
        reference = greedy_no_cache(sim, inputs, NEW_TOKENS, suppress=media_ids)
    valid = inputs["attention_mask"].bool()
    if layout is None:
        got, want = logits[valid], expected[valid]
    else:
        got = logits[layout.valid]
        want = expected.gather(1, layout.index.unsqueeze(-1).expand(-1, -1, expected.shape[-1]))[layout.valid]
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4, msg=name)
    assert torch.equal(generated, reference), name


@pytest.mark.parametrize(("family", "attn", "name"), MATRIX, ids=["-".join(m) for m in MATRIX])
def test_yopo_matches_masked_simulation(family, attn, name):
    case = _case(family, attn)
    _check(case, _strategies(case)[name], name)


def test_window_on_video_frames():
    """Qwen2-VL video: each frame is a grid of its own (a row holds a video, another an image and a video)."""
    case = _case("qwen2_vl", "sdpa")
    inputs = case.inputs(images_per_row=[0, 1, 0], videos_per_row=[1, 1, 0], text_len=[5, 4, 6])
    _check(case, dict(window=3), "video", inputs)
    _check(case, dict(window=3, window_kernel="flex"), "video, FlexAttention", inputs)
    _check(case, dict(window=3, dense_below=10**9), "video, dense", inputs)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "internvl", "idefics3", "qwen3_vl"])
def test_every_strategy_on_other_families(family):
    case = build_tiny(family, num_layers=LAYERS)
    case.model.generation_config.eos_token_id = None
    _check(case, dict(_strategies(case)["all"]), family)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "internvl", "idefics3"])
def test_window_on_tiles_and_anyres_grids(family):
    """The window against the brute-force neighbourhood of frames cut from the model's own features: InternVL tiles
    and Idefics3 crops are frames of their own; an anyres image is its base frame, its high-res grid and that grid's
    newline column (a frame of its own), OneVision's video frames and trailing newline too. Tiles of SDPA, the dense
    masks, and (anyres) FlexAttention."""
    case = _case(family, "sdpa")
    inputs = case.inputs(
        images_per_row=[1, 2, 0], text_len=[5, 3, 7], videos_per_row=[0, 0, 1] if case.supports_video else None
    )
    _check(case, dict(window=3), f"{family}, tiles", inputs)
    _check(case, dict(window=3, dense_below=10**9), f"{family}, dense", inputs)
    if family == "llava_onevision":
        _check(case, dict(window=3, window_kernel="flex"), f"{family}, FlexAttention", inputs)


def test_remove_restores_the_model_bit_for_bit():
    case = build_tiny("qwen2_vl", num_layers=LAYERS)
    inputs = family_batch(case)
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    with torch.no_grad():
        before = case.model(**inputs).logits
        handle = vtexit.yopo(case.model, _config(_strategies(case)["all"]))
        patched = case.model(**inputs).logits
        handle.remove()
        after = case.model(**inputs).logits
    assert not torch.equal(patched[:, -1], before[:, -1])
    assert torch.equal(after, before)
    assert all(torch.equal(v, state[k]) for k, v in case.model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in case.model.modules())


def test_cost_records_count_what_ran():
    case = build_tiny("llava", num_layers=LAYERS)
    inputs = family_batch(case)
    settings = _strategies(case)["all"]
    text = case.model.config.get_text_config()
    with torch.no_grad(), vtexit.yopo(case.model, _config(settings)) as handle:
        case.model(**inputs)
        layers = handle.last_cost.prefill.layers
        flops = run_flops(DecoderShape.from_model(case.model), handle.last_cost)
    media, frame, row, col = hand_grid(case.model, inputs["input_ids"], inputs)
    valid = inputs["attention_mask"].bool()
    # Keys of each visual query by brute force: neighbours on its grid (3 x 3) plus earlier text tokens.
    expected_keys = torch.zeros(len(media), dtype=torch.long)
    for b in range(len(media)):
        for q in media[b].nonzero().flatten().tolist():
            near = (
                media[b]
                & (frame[b] == frame[b, q])
                & ((row[b] - row[b, q]).abs() <= 1)
                & ((col[b] - col[b, q]).abs() <= 1)
            )
            earlier = ~media[b] & valid[b] & (torch.arange(media.shape[1]) < q)
            expected_keys[b] += int(near.sum() + earlier.sum())
    # What ran: the 4 x 4 images here are one tile each, whose halo is the whole image, plus the text keys before the
    # image, as many per tile as the most any image of the batch has, masked to the window: 16 queries x (16 + text)
    # keys per image.
    text_before = [
        int((valid[b] & ~media[b])[: int(media[b].nonzero()[16 * f])].sum())
        for b in range(len(media))
        for f in range(int(media[b].sum()) // 16)
    ]
    computed = (media & valid).sum(1) * (16 + max(text_before))
    assert bool((expected_keys <= computed).all())
    active = settings["heads"]
    for i, layer in enumerate(layers):
        if i < settings["layer_drop"]:
            assert torch.equal(layer.visual_keys.cpu(), computed), i
            assert layer.head_fraction == pytest.approx(float(active[i].float().mean())), i
            assert layer.ffn_fraction == pytest.approx(round(text.intermediate_size / 3) / text.intermediate_size)
            assert torch.equal(layer.visual_queries.cpu(), (media & valid).sum(1))
        else:
            assert int(layer.visual_queries.sum()) == 0
    with torch.no_grad(), vtexit.withdraw(case.model, layer=settings["layer_drop"]) as vtw:
        case.model(**inputs)
        vtw_flops = run_flops(DecoderShape.from_model(case.model), vtw.last_cost)
    assert len(flops) == len(vtw_flops) == 3
    for ours, withdrawal, has_image in zip(flops, vtw_flops, media.any(1).tolist(), strict=True):
        assert (ours.prefill < withdrawal.prefill) if has_image else (ours.prefill == withdrawal.prefill)


@torch.no_grad()
def test_dense_execution_records_the_unpatched_cost():
    case = build_tiny("llava", num_layers=LAYERS)
    inputs = family_batch(case)
    settings = {k: v for k, v in _strategies(case)["all-dense"].items() if k != "layer_drop"}
    shape = DecoderShape.from_model(case.model)
    with vtexit.yopo(case.model, _config(settings)) as handle:
        case.model(**inputs)
        dense = run_flops(shape, handle.last_cost)
    with vtexit.baseline(case.model) as handle:
        case.model(**inputs)
        unpatched = run_flops(shape, handle.last_cost)
    assert [f.prefill for f in dense] == [f.prefill for f in unpatched]


def test_deepcopy_of_a_yopo_patched_model_has_its_own_patch():
    case = build_tiny("llava", num_layers=LAYERS)
    inputs = family_batch(case)
    with torch.no_grad():
        handle = vtexit.yopo(case.model, _config(_strategies(case)["all"]))
        patched = case.model(**inputs).logits
        twin = copy.deepcopy(case.model)
        handle.remove()
        assert torch.equal(twin(**inputs).logits, patched)
        vtexit.patch_of(twin).remove()
        assert torch.equal(twin(**inputs).logits, case.model(**inputs).logits)


def test_config_round_trips_and_refuses_bad_settings(tmp_path):
    case = build_tiny("llava", num_layers=LAYERS)
    active = _active(case)
    config = vtexit.YOPOConfig(window=5, heads=vtexit.HeadMask(active), layer_drop=3, ffn_ratio=2)
    assert vtexit.config_from_dict(config.to_dict()) == config
    for suffix in (".json", ".safetensors"):
        path = tmp_path / f"heads{suffix}"
        vtexit.HeadMask(active).save(path)
        assert torch.equal(vtexit.HeadMask.load(path).active, active)
        assert vtexit.config_from_dict({"method": "yopo", "heads": str(path), "window": "5"}).heads == config.heads
    bad = [
        (dict(window=4), "window"),
        (dict(window=True), "window"),
        (dict(ffn_ratio=0.5), "ffn_ratio"),
        (dict(ffn_ratio=float("nan")), "ffn_ratio"),
        (dict(pruned_text="drop"), "pruned_text"),
        (dict(window=3, window_kernel="triton"), "window_kernel"),
        (dict(heads=[[1, 2]]), "heads"),
    ]
    for settings, name in bad:
        with pytest.raises(ValueError, match=name):
            vtexit.YOPOConfig(**settings)
    model_bad = [
        (dict(heads=active[:, :1]), "heads"),
        (dict(layer_drop=0), "layer_drop"),
        (dict(layer_drop=LAYERS + 1), "layer_drop"),
    ]
    for settings, name in model_bad:
        with pytest.raises(ValueError, match=name):
            vtexit.yopo(case.model, vtexit.YOPOConfig(**settings))
        assert vtexit.patch_of(case.model) is None
    without_grid = dataclasses.replace(family_for(case.model), visual_grid=None)
    with pytest.raises(ValueError, match="window needs the visual patch grid"):
        vtexit.yopo(case.model, vtexit.YOPOConfig(window=3), family=without_grid)
    assert vtexit.patch_of(case.model) is None
    gemma = build_tiny("gemma3", num_layers=LAYERS).model
    for layer in gemma.model.language_model.layers:  # YOPO does not cap logits (Gemma3 itself leaves them uncapped)
        layer.self_attn.attn_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        vtexit.yopo(
            gemma,
            vtexit.YOPOConfig(
                heads=torch.ones(
                    LAYERS, gemma.config.get_text_config().num_attention_heads, dtype=torch.bool
                ).index_fill_(1, torch.tensor([0]), False)
            ),
        )
    assert vtexit.patch_of(gemma) is None


@torch.no_grad()
def test_head_scores_and_mask_match_eager_attentions():
    case = build_tiny("llava", attn_implementation="eager", num_layers=LAYERS)
    inputs = family_batch(case)
    attentions = case.model(**inputs, output_attentions=True).attentions  # brute force: (batch, heads, q, k)
    media = case.media_mask(inputs)
    valid = inputs["attention_mask"].bool()
    expected = torch.zeros(len(media), LAYERS, attentions[0].shape[1])
    for b in range(len(media)):
        queries = valid[b]
        for i, layer in enumerate(attentions):
            on = layer[b][:, queries]
            to_visual = on[..., media[b] & valid[b]].sum((-1, -2))
            to_text = on[..., ~media[b] & valid[b]].sum((-1, -2))
            expected[b, i] = to_visual / to_text
    from vtexit.methods.yopo.heads import head_scores

    scores = head_scores(case.model, inputs)
    with_image = media.any(1)
    torch.testing.assert_close(scores[with_image], expected[with_image], atol=1e-4, rtol=1e-4)
    assert scores[~with_image].isnan().all()
    # The mask: a head stays active when it passes the keep-quantile threshold on more than `vote` of the rows.
    deep = expected[with_image][:, 2:]
    threshold = deep.flatten().quantile(0.5)
    wanted = (expected[with_image] > threshold).float().mean(0) > 0.4
    wanted[:2] = True
    mask = vtexit.calibrate_heads(case.model, inputs, keep=0.5, progress=False)
    assert torch.equal(mask.active, wanted)
    absolute = vtexit.calibrate_heads(case.model, [inputs, inputs], threshold=0.0, vote=0.0, progress=False)
    assert absolute.active.all()
    with pytest.raises(ValueError, match="keep"):
        vtexit.calibrate_heads(case.model, inputs, keep=0.0)
    with pytest.raises(ValueError, match="visual tokens"):
        text_only = case.inputs(images_per_row=[0, 0], text_len=[4, 6])
        vtexit.calibrate_heads(case.model, text_only, progress=False)


@torch.no_grad()
def test_torch_compile_runs_the_replaced_forwards_exactly():
    case = build_tiny("llava", num_layers=LAYERS)
    inputs = family_batch(case)
    with vtexit.yopo(case.model, _config(_strategies(case)["all"])):
        eager = case.model(**inputs).logits
        compiled = torch.compile(case.model, backend="eager")
        torch.testing.assert_close(compiled(**inputs).logits, eager, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_a_tuning_step_with_yopo_active_matches_the_simulation_and_trains_only_lora():
    """Under peft LoRA the sliced products keep the LoRA path (a LoRA wrapper computes its full product, then is
    sliced): the loss equals the masked simulation's cross-entropy on the answer tokens; only LoRA gets gradients."""
    from torch.nn import functional as F

    from vtexit.training import ConfigSampler, LoraSettings, tune
    from vtexit.training.tune import step_loss, trainable_lora

    case = build_tiny("llava", num_layers=LAYERS)
    trainable_lora(case.model, LoraSettings(r=4, alpha=8))  # LoRA added; everything else frozen, as tune() does
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_lora(case.model, None):  # peft starts B at zero: random factors make LoRA count
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    inputs = family_batch(case)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    settings = dict(_strategies(case)["all"], layer_drop=None)  # every position kept: the loss covers all rows
    config = _config(settings)
    sim = _sim(case, settings)
    logits = sim(**inputs, use_cache=False).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss = step_loss(case.model, {**inputs, "labels": labels}, config)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    with_grad = {n for n, p in case.model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    result = tune(case.model, iter([{**inputs, "labels": labels}] * 2), ConfigSampler((config,)), steps=2, lr=1e-3,
                  seed=0, progress=False, lora=None)  # fmt: skip
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


@torch.no_grad()
def test_host_syncs_do_not_grow_with_layers():
    """YOPO's index tensors are built once per prefill (the row blocks' widths: one read; the window tiles: one copy of
    the grid), so syncs do not grow with the number of layers, and decode steps add none. (The profiler counts scalar
    reads; the two copies are on top of them.)"""
    from torch.profiler import ProfilerActivity, profile

    def syncs(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")

    counts = {}
    inputs = family_batch(_case("llava", "sdpa"))  # the same vocabulary and vision tower at any depth
    for layers in (4, 8):
        model = build_tiny("llava", num_layers=layers).model
        active = torch.ones(layers, model.config.text_config.num_attention_heads, dtype=torch.bool)
        active[2:, 0] = False
        config = vtexit.YOPOConfig(window=3, heads=active, ffn_ratio=2)
        unpatched = syncs(lambda m=model: m(**inputs))
        with vtexit.yopo(model, config):
            counts[layers] = syncs(lambda m=model: m(**inputs)) - unpatched

            def generate(steps, m=model):
                return lambda: m.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

            patched_steps = syncs(generate(4)) - syncs(generate(2))
        assert patched_steps == syncs(generate(4)) - syncs(generate(2))  # unpatched: the same per decode step
    assert counts[4] == counts[8] <= 2


@pytest.mark.parametrize("images_per_row, text_len", [([1], [6]), ([1, 1], [5, 5])])
def test_visual_rows_in_one_run_are_sliced_and_exact(images_per_row, text_len):
    """One image per row at the same slots (batch 1, or rows laid out alike): the visual block is a slice of the
    sequence (no gathers); against the simulation as everywhere else."""
    case = _case("llava", "sdpa")
    inputs = case.inputs(images_per_row, text_len=text_len)
    valid = inputs["attention_mask"].bool()
    media = case.media_mask(inputs) & valid
    first = [int(row.nonzero()[0]) for row in media]
    assert split_rows(media, valid).visual.run == first[0] == first[-1]
    assert split_rows(*_media_and_valid(case, family_batch(case))).visual.run is None
    for name in ("window", "heads", "ffn", "all", "window-flex"):
        _check(case, _strategies(case)[name], name, inputs)


def _media_and_valid(case, inputs):
    valid = inputs["attention_mask"].bool()
    return case.media_mask(inputs) & valid, valid
