"""What a reliability campaign found in the method configs, one test per finding: no setting is accepted and then
silently does nothing, every accepted setting runs, every config checks its numbers the same way (numbers as numbers,
finite, in range, numpy's ints and floats stored as plain ones, refusals that name the setting), and refusals speak
of what the user set, not of vtexit's internals."""

from __future__ import annotations

import copy
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

import vtexit
from vtexit.testing.tiny_models import build_tiny

PATCHES = 16  # visual tokens per image of the tiny LLaVA (a 4 x 4 grid)


@pytest.fixture(scope="module")
def llava():
    case = build_tiny("llava", num_layers=4)
    assert case.model.config.image_seq_length == PATCHES
    return case


@pytest.fixture(autouse=True)
def unpatched(llava):
    """Each test starts on the unpatched model, whatever the one before left (tests assert what they leave)."""
    yield
    handle = vtexit.patch_of(llava.model)
    if handle is not None:
        handle.remove()


def visual_kept(case, inputs: dict, handle) -> list[int]:
    """Per row: the visual tokens the last call kept (its slots, less the row's text tokens)."""
    media = case.media_mask(inputs)
    text = (inputs["attention_mask"].bool() & ~media).sum(1)
    return (handle.last_layout.valid.sum(1) - text).tolist()


def round_half_up(keep: float, tokens: int) -> int:
    """vtexit's count of a kept fraction (FastV's rule: round half up, at least one), worked out apart."""
    return max(1, int(Fraction(keep).limit_denominator(10**6) * tokens + Fraction(1, 2)))


# ------------------------------------------------------------------------------------------------------ no silent case
def test_a_removed_handle_refuses_a_with_block(llava):
    model = llava.model
    handle = vtexit.apply(model, vtexit.VTWConfig(layer=2))
    handle.remove()
    with pytest.raises(ValueError, match="has been removed.*patch it again"):
        with handle:
            pass
    assert vtexit.patch_of(model) is None
    with vtexit.apply(model, vtexit.VTWConfig(layer=2)) as live:  # a live handle still works as before
        assert live.active and vtexit.patch_of(model) is live
    assert not live.active and vtexit.patch_of(model) is None


HYBRID = {"method": "hybrid", "pre": {"method": "divprune", "keep": 0.5}, "then": {"method": "vtw", "layer": 2}}


@pytest.mark.parametrize("clash_first", [False, True])
def test_a_dotted_key_that_clashes_with_a_nested_step_is_refused_and_the_input_left_alone(clash_first):
    data = {**HYBRID, "pre.keep": 0.25}
    if clash_first:  # the same clash, the dotted key before the step
        data = {
            "method": "hybrid",
            "pre.keep": 0.25,
            "pre": {"method": "divprune", "keep": 0.5},
            "then": HYBRID["then"],
        }
    before = copy.deepcopy(data)
    with pytest.raises(ValueError, match=r"'pre\.keep'|pre\.<name>"):
        vtexit.config_from_dict(data)
    assert data == before
    # The clash at the top level was already refused.
    with pytest.raises(ValueError, match="given both as a value and as pre"):
        vtexit.config_from_dict({"method": "hybrid", "pre.method": "divprune", "pre": "divprune"})


def test_building_a_config_never_changes_the_callers_dicts():
    data = copy.deepcopy(HYBRID)
    data["then"]["layer"] = "2"  # text, as a CLI gives it: the config converts its own copy
    before = copy.deepcopy(data)
    config = vtexit.config_from_dict(data)
    assert data == before
    assert config.then == {"method": "vtw", "layer": 2} and config.then is not data["then"]
    flat = {"method": "hybrid", "pre.method": "divprune", "pre.keep": "0.5", "then.method": "vtw", "then.layer": "2"}
    flat_before = dict(flat)
    assert vtexit.config_from_dict(flat) == config
    assert flat == flat_before
    direct = vtexit.HybridConfig(pre=data["pre"], then=data["then"])
    assert data == before and direct.pre is not data["pre"]


def test_yopo_without_a_strategy_is_refused():
    with pytest.raises(ValueError, match="yopo needs at least one strategy.*window, heads, layer_drop or ffn_ratio"):
        vtexit.YOPOConfig()
    with pytest.raises(ValueError, match="window, heads, layer_drop or ffn_ratio"):
        vtexit.config_from_dict({"method": "yopo", "pruned_text": "zero", "dense_below": "0"})
    assert vtexit.YOPOConfig(layer_drop=2).layer_drop == 2  # one strategy is enough


@torch.no_grad()
def test_pool_refuses_a_stride_wider_than_the_grid_when_applied(llava):
    model = llava.model
    config = vtexit.PoolConfig(stride=100)  # the config cannot know the grid: the model does
    with pytest.raises(
        ValueError, match=r"stride=100 is larger than this model's 4 x 4 grid.*stride to an int in \[2, 4\]"
    ):
        vtexit.apply(model, config)
    assert vtexit.patch_of(model) is None
    hybrid = {"method": "hybrid", "pre.method": "pool", "pre.stride": "5", "then.method": "vtw", "then.layer": "2"}
    with pytest.raises(ValueError, match="pre: stride=5 is larger"):
        vtexit.apply(model, vtexit.config_from_dict(hybrid))
    assert vtexit.patch_of(model) is None
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    for stride, per_image in ((4, 1), (2, 4), (3, 4)):  # the grid's side pools each image into one token
        with vtexit.pool(model, stride=stride) as handle:
            model(**inputs)
            assert visual_kept(llava, inputs, handle) == [per_image, 2 * per_image], stride


# ----------------------------------------------------------------------------------------- every accepted setting runs
VISIONZIP_KEEPS = (1 / 16, 2 / 16, 3 / 16, 0.25, 0.3, 0.5, 0.75, 15 / 16, 1.0, 0.0, -0.5, 1.5)
VISIONZIP_SHARES = (0.0, 0.05, 0.1, 10 / 64, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0, -0.1)


@torch.no_grad()
def test_every_visionzip_keep_and_contextual_share_runs_or_is_refused_by_name(llava):
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    ran = 0
    for keep, share in itertools.product(VISIONZIP_KEEPS, VISIONZIP_SHARES):
        valid = 0 < keep <= 1 and 0 <= share < 1
        try:
            config = vtexit.VisionZipConfig(keep=keep, contextual_share=share)
        except ValueError as err:
            assert not valid, (keep, share, err)
            assert ("keep" if not 0 < keep <= 1 else "contextual_share") in str(err)
            continue
        assert valid, (keep, share)
        tokens = round_half_up(keep, PATCHES)
        with vtexit.apply(model, config) as handle:
            logits = model(**inputs).logits
            assert visual_kept(llava, inputs, handle) == [tokens, 2 * tokens], (keep, share)
        assert torch.isfinite(logits).all(), (keep, share)
        ran += 1
    assert ran == 9 * 9
    assert vtexit.patch_of(model) is None


@torch.no_grad()
def test_dart_clips_more_pivots_than_the_prompt_holds(llava):
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    slots = inputs["input_ids"].shape[1]
    config = vtexit.DARTConfig(layer=2, keep=0.25, pivots_visual=slots + 10, pivots_text=slots + 10)
    with vtexit.apply(model, config) as handle:
        assert torch.isfinite(model(**inputs).logits).all()
        # Every visual token is a visual pivot, and a row keeps its visual pivots.
        assert visual_kept(llava, inputs, handle) == [PATCHES, 2 * PATCHES]
    for visual, text in ((0, 50), (50, 0), (3, 50)):
        with vtexit.apply(model, vtexit.DARTConfig(layer=2, keep=0.5, pivots_visual=visual, pivots_text=text)):
            assert torch.isfinite(model(**inputs).logits).all()


@torch.no_grad()
def test_a_hybrid_with_dart_as_its_then_step_runs(llava):
    """DART reads the keys of the layer before its own: the hybrid must ask the engine for them (found by
    tests/test_config_properties.py: 'keys of layer 1 were not recorded')."""
    model = llava.model
    inputs = llava.inputs([1, 2], text_len=[4, 6])
    config = vtexit.HybridConfig(pre={"method": "pool", "stride": 2}, then={"method": "dart", "layer": 2, "keep": 0.5})
    with vtexit.apply(model, config) as handle:
        assert torch.isfinite(model(**inputs).logits).all()
        # Pooling leaves 4 tokens per image; DART (4 visual pivots) keeps them all in the 1-image row and 4 of 8 in
        # the other (budget 4 // 8 pivots = no token per pivot: only the visual pivots stay).
        assert visual_kept(llava, inputs, handle) == [4, 4]


# ------------------------------------------------------------------------------------- one validation for every config
# A valid config of each method (as a dict, without "method"): the base the settings below are varied on.
VALID = {
    "none": {},
    "vtw": {"layer": 2},
    "fastv": {"layer": 2, "keep": 0.5},
    "random_drop": {"layer": 2, "keep": 0.5, "seed": 3},
    "dart": {"layer": 2, "keep": 0.5, "pivots_visual": 2, "pivots_text": 2},
    "pdrop": {"layers": (1, 2), "keep": 0.5, "renumber": True},
    "divprune": {"keep": 0.5},
    "visionzip": {"keep": 0.5, "contextual_share": 0.25},
    "pool": {"stride": 2},
    "yopo": {"window": 3, "layer_drop": 3, "ffn_ratio": 2.0, "dense_below": 0, "pruned_text": "zero"},
    "dyvte": {"threshold": 0.5},
    "hybrid": {"pre": {"method": "divprune", "keep": 0.5}, "then": {"method": "fastv", "layer": 2, "keep": 0.5}},
}
INT_SETTINGS = [
    ("vtw", "layer"),
    ("fastv", "layer"),
    ("random_drop", "layer"),
    ("random_drop", "seed"),
    ("dart", "layer"),
    ("dart", "pivots_visual"),
    ("dart", "pivots_text"),
    ("pool", "stride"),
    ("yopo", "window"),
    ("yopo", "layer_drop"),
    ("yopo", "dense_below"),
]
FLOAT_SETTINGS = [
    ("fastv", "keep"),
    ("random_drop", "keep"),
    ("dart", "keep"),
    ("pdrop", "keep"),
    ("divprune", "keep"),
    ("visionzip", "keep"),
    ("visionzip", "contextual_share"),
    ("yopo", "ffn_ratio"),
    ("dyvte", "threshold"),
]
NUMBER_SETTINGS = INT_SETTINGS + FLOAT_SETTINGS
CHOICE_SETTINGS = [("pdrop", "renumber"), ("yopo", "pruned_text"), ("yopo", "window_kernel"), ("dyvte", "gates")]


def config_class(method: str):
    return vtexit.method_configs()[method]


def make(method: str, **changes):
    return config_class(method)(**{**VALID[method], **changes})


def refusal(model, method: str, **changes) -> str:
    """The message of the ValueError that refuses these settings, when the config is built or when it is applied to
    ``model`` (which must then be left unpatched); fails if neither refuses."""
    try:
        config = make(method, **changes)
    except ValueError as err:
        return str(err)
    with pytest.raises(ValueError) as info:
        vtexit.apply(model, config).remove()
    assert vtexit.patch_of(model) is None
    return str(info.value)


def test_every_registered_method_is_covered():
    assert set(VALID) == set(vtexit.method_configs())


@pytest.mark.parametrize("method, name", INT_SETTINGS)
def test_int_settings_take_any_integral_and_store_a_plain_int(method, name):
    for value in (np.int64(VALID[method][name]), np.int32(VALID[method][name]), np.uint8(VALID[method][name])):
        config = make(method, **{name: value})
        assert type(getattr(config, name)) is int and getattr(config, name) == VALID[method][name]
        assert vtexit.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("method, name", FLOAT_SETTINGS)
def test_float_settings_take_any_real_and_store_a_float(method, name):
    value = VALID[method][name]
    whole = 0 if name == "contextual_share" else 1  # an int in the setting's range
    for given in (np.float32(value), np.float64(value), Fraction(value), whole, np.int64(whole)):
        config = make(method, **{name: given})
        assert type(getattr(config, name)) is float and getattr(config, name) == float(given)
        assert vtexit.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("method, name", NUMBER_SETTINGS)
def test_bools_are_refused_where_a_number_is_expected(llava, method, name):
    for value in (True, False, np.bool_(True)):
        assert name in refusal(llava.model, method, **{name: value})


@pytest.mark.parametrize("method, name", NUMBER_SETTINGS)
def test_non_finite_and_huge_numbers_are_refused_by_name(llava, method, name):
    """A ValueError naming the setting (never an OverflowError from a float conversion)."""
    huge = (2**64,) if (method, name) in INT_SETTINGS else ()  # more than any int setting takes
    for value in (float("nan"), float("inf"), -float("inf"), 10**400, -(10**400), Fraction(10**400), *huge):
        message = refusal(llava.model, method, **{name: value})
        assert name in message and len(message) < 400, (value, message)


@pytest.mark.parametrize("method, name", NUMBER_SETTINGS + CHOICE_SETTINGS)
def test_sequences_are_refused_where_one_value_is_expected(llava, method, name):
    value = VALID[method].get(name, {"gates": "default", "window_kernel": "auto"}.get(name))
    for given in ([value], (value,), {"value": value}):
        assert name in refusal(llava.model, method, **{name: given})


def test_keep_of_ten_to_the_400_names_keep():
    with pytest.raises(ValueError, match="keep must be in"):
        vtexit.FastVConfig(layer=2, keep=10**400)
    with pytest.raises(ValueError, match="keep"):
        vtexit.config_from_dict({"method": "divprune", "keep": "1e400"})


@pytest.mark.parametrize(
    "method, settings, missing",
    [
        ("fastv", {"keep": 0.5}, "'layer'"),
        ("vtw", {}, "'layer'"),
        ("random_drop", {"layer": 2}, "'keep'"),
        ("visionzip", {}, "'keep'"),
        ("hybrid", {"pre": {"method": "divprune", "keep": 0.5}}, "'then'"),
        ("hybrid", {"pre": {"method": "divprune"}, "then": {"method": "vtw", "layer": 2}}, "'keep'"),
    ],
)
def test_a_missing_required_setting_is_named(method, settings, missing):
    with pytest.raises(ValueError, match=f"missing required setting {missing} for method '"):
        vtexit.config_from_dict({"method": method, **settings})


def test_fastv_without_layer_names_it():
    with pytest.raises(ValueError, match="missing required setting 'layer' for method 'fastv'"):
        vtexit.config_from_dict({"method": "fastv", "keep": 0.5})
    with pytest.raises(TypeError, match="layer"):
        vtexit.FastVConfig(keep=0.5)


@pytest.mark.parametrize(
    "data, match",
    [
        (None, "must be a dict such as"),
        ([("method", "vtw")], "must be a dict such as"),
        ("vtw", "must be a dict such as"),
        ({"method": "vtw", 3: 1}, "setting names must be strings, got 3"),
        (
            {"method": "hybrid", "pre": {"method": "divprune", 1: 2}, "then": {"method": "vtw"}},
            r"strings, got 1 \(in pre\)",
        ),
        ({"method": ["vtw"], "layer": 2}, r"method must be one of .*got \['vtw'\]"),
        ({"method": None}, "method must be one of"),
        ({"layer": 2}, "method must be one of"),
        ({"method": "vtw", "layer": 2, "keep": 0.5}, "unknown settings"),
    ],
)
def test_config_from_dict_says_what_it_expects(data, match):
    with pytest.raises(ValueError, match=match):
        vtexit.config_from_dict(data)


@pytest.mark.parametrize("method", sorted(VALID))
def test_every_config_round_trips_through_json(method):
    config = make(method)
    assert vtexit.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    text = {
        k: json.dumps(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        for k, v in VALID[method].items()
    }
    assert vtexit.config_from_dict({"method": method, **text}) == config  # numbers given as text, as a CLI does


# ---------------------------------------------------------------------------------------- messages in the user's words
RUNS_EVERYWHERE = [
    vtexit.VTWConfig(layer=2),
    vtexit.FastVConfig(layer=2, keep=0.5),
    vtexit.DARTConfig(layer=2, keep=0.5),
    vtexit.RandomDropConfig(layer=2, keep=0.5),
    vtexit.PDropConfig(layers=(2, 3), keep=0.5),
]


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_renumbering_inside_the_language_model_says_which_family_refuses_it_and_what_runs_there(family):
    case = build_tiny(family, num_layers=4)
    model = case.model
    with pytest.raises(
        ValueError, match=f"pdrop's renumber=True is not supported for {family} yet.*use renumber=False"
    ) as info:
        vtexit.apply(model, vtexit.PDropConfig(layers=(3,), keep=0.5, renumber=True))
    assert "renumber_positions" not in str(info.value)
    assert vtexit.patch_of(model) is None
    # What the message points to runs there, and so do reductions before the language model (kept positions).
    inputs = case.inputs([1, 2], text_len=[4, 6])
    hybrid = vtexit.HybridConfig(pre={"method": "divprune", "keep": 0.5}, then={"method": "vtw", "layer": 3})
    for config in (*RUNS_EVERYWHERE, vtexit.DivPruneConfig(keep=0.5), vtexit.PoolConfig(), hybrid):
        with vtexit.apply(model, config):
            assert torch.isfinite(model(**inputs).logits).all(), config


def test_pdrops_default_layers_on_a_smaller_model_are_reported_as_defaults():
    model = build_tiny("llava", num_layers=6).model
    match = r"pdrop's default layers \(8, 16, 24\) do not fit this 6-layer model.*; set layers=\.\.\. .*\[1, 5\]"
    with pytest.raises(ValueError, match=match):
        vtexit.pdrop(model)
    with pytest.raises(ValueError, match=match):
        vtexit.apply(model, vtexit.config_from_dict({"method": "pdrop"}))
    with pytest.raises(ValueError, match="layers must be in"):  # layers the user chose: the plain range message
        vtexit.pdrop(model, layers=(2, 9))
    assert vtexit.patch_of(model) is None


def test_dyvtes_shipped_gates_on_another_model_point_to_training_gates(llava):
    match = r"default gates were trained for vtexit's default model.*`vtexit train-gates` or vtexit\.train_gates"
    with pytest.raises(ValueError, match=match):
        vtexit.dyvte(llava.model)
    with pytest.raises(ValueError, match=match):
        vtexit.apply(llava.model, vtexit.DyVTEConfig())
    with pytest.raises(ValueError, match="gates were made for a model"):  # gates of the user's own: as before
        vtexit.dyvte(llava.model, vtexit.DyVTEGates.for_model(build_tiny("llava", num_layers=6).model))
    assert vtexit.patch_of(llava.model) is None
