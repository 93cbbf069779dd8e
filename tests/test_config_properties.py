"""A property of every registered method config, checked with Hypothesis on drawn settings (plausible values and
hostile ones: ints of any size, floats with NaN / inf / huge, bools, text, None, lists, numpy scalars): a settings
dict is either refused with a ValueError / TypeError that names one of the settings given (or the method), or it
makes a config that round-trips through JSON and patches a tiny 4-layer LLaVA for one forward with finite logits.

Derandomized (the same examples on every run) and kept small so that the whole file runs in well under a minute on
one core. Failures it finds are fixed in the code, not filtered here."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vtexit
from vtexit.testing.tiny_models import build_tiny

LAYERS, HEADS = 4, 4  # the tiny LLaVA's decoder layers and attention heads
EXAMPLES = 30  # per method: about 25 s for the file on one core
PRE_LLM = ("divprune", "pool", "visionzip")
IN_LLM = ("vtw", "fastv", "pdrop", "random_drop", "dart", "dyvte")


@functools.cache
def llava():
    case = build_tiny("llava", num_layers=LAYERS)
    assert case.model.config.get_text_config().num_attention_heads == HEADS
    return case, case.inputs([1, 2], text_len=[4, 6])


# Values no setting takes, or only some do.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.builds(np.bool_, st.booleans()),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**31, 2**62, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, -0.0]),
    st.builds(np.int64, st.integers(-(2**62), 2**62)),
    st.builds(np.float32, st.floats(-4, 4, width=32)),
    st.text(max_size=6),
    st.sampled_from(["", "none", "None", "nan", "inf", "-1", "1e400", "0.5", "2", "true", "3,2", "1,2,3"]),
    st.lists(st.integers(-2, 6), max_size=3),
    st.tuples(st.floats(0, 1)),
    st.dictionaries(st.sampled_from(["method", "keep", "layer"]), st.integers(0, 3), max_size=2),
)
# What each setting plausibly takes: mostly values it accepts, with its edges and a few just past them.
LAYER = st.one_of(
    st.integers(1, LAYERS - 1), st.builds(np.int64, st.integers(1, LAYERS - 1)), st.sampled_from([0, LAYERS])
)
FRACTION = st.one_of(
    st.floats(0, 1, exclude_min=True),
    st.sampled_from([1 / 16, 1 / 8, 0.25, 0.9, 1.0, 1e-9, 5e-324, 1, 0.0, 1.5]),
    st.builds(np.float32, st.floats(0.25, 1, width=32)),
)
HEAD_MASK = st.lists(st.lists(st.booleans(), min_size=HEADS, max_size=HEADS), min_size=LAYERS, max_size=LAYERS)
PLAUSIBLE = {
    "layer": LAYER,
    "layer_drop": LAYER,
    "keep": FRACTION,
    "contextual_share": st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([0, 0.9, 0.999999, 1.0])),
    "threshold": FRACTION,
    "seed": st.one_of(st.integers(0, 2**40 - 1), st.builds(np.int64, st.integers(0, 100)), st.just(2**40)),
    "pivots_visual": st.integers(0, 60),
    "pivots_text": st.integers(0, 60),
    "stride": st.integers(2, 5),
    "window": st.one_of(st.sampled_from([1, 3, 5, 7, 9, 2**31 - 1, 2]), st.builds(np.int64, st.sampled_from([1, 3]))),
    "ffn_ratio": st.one_of(st.floats(1, 8), st.sampled_from([1, 3, 1e308])),
    "dense_below": st.one_of(st.integers(0, 100), st.sampled_from([0, 10**9, 2**62])),
    "pruned_text": st.sampled_from(["renormalise", "zero"]),
    # "flex" is left out only for time: it compiles FlexAttention (minutes on a CPU); tests/test_yopo.py runs it.
    "window_kernel": st.sampled_from(["auto", "tiles"]),
    "renumber": st.one_of(st.booleans(), st.sampled_from(["true", "0"])),
    "layers": st.one_of(
        st.lists(st.integers(1, LAYERS - 1), min_size=1, max_size=3, unique=True).map(sorted),
        st.sampled_from(["1,2", "2 3", "1/2/3"]),
    ),
    "gates": st.sampled_from(["default", "/nonexistent/gates"]),
    "heads": st.one_of(HEAD_MASK, st.just("missing-heads.json")),
}
REQUIRED = {
    method: {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    for method, cls in vtexit.method_configs().items()
}


def draw_settings(data: st.DataObject, method: str) -> dict:
    """A settings dict for ``method``. Each example is drawn in one of three moods: plausible values only (the
    required settings always given), one hostile value among plausible ones, or hostile values anywhere (and now and
    then a setting the method does not have). A hybrid's steps are drawn the same way, nested or as dotted keys."""
    fields = [f.name for f in dataclasses.fields(vtexit.method_configs()[method])]
    mood = data.draw(st.sampled_from(["plausible", "plausible", "one hostile", "hostile"]), label=f"{method} mood")
    spoiled = data.draw(st.sampled_from(fields), label="hostile setting") if fields and mood == "one hostile" else None
    drawn = {}
    for name in fields:
        given = name in REQUIRED[method] if mood != "hostile" else False
        if not given and not data.draw(st.booleans(), label=f"give {name}"):
            continue
        if (mood == "hostile" and data.draw(st.booleans(), label=f"{name} hostile")) or name == spoiled:
            drawn[name] = data.draw(HOSTILE, label=name)
        elif method == "hybrid":
            step = data.draw(st.sampled_from(PRE_LLM if name == "pre" else IN_LLM + PRE_LLM[:1]), label=name)
            value = {"method": step, **draw_settings(data, step)}
            if data.draw(st.booleans(), label=f"{name} dotted"):
                drawn.update({f"{name}.{key}": v for key, v in value.items()})  # as lmms-eval's model_args give it
            else:
                drawn[name] = value
        else:
            drawn[name] = data.draw(PLAUSIBLE.get(name, HOSTILE), label=name)
    if mood == "hostile" and data.draw(st.integers(0, 3), label="unknown setting") == 0:
        drawn[data.draw(st.sampled_from(["bogus", "Layer", "keep ", "method.x"]), label="unknown")] = 1
    return drawn


def named(error: Exception, method: str, given_settings: dict) -> bool:
    """Whether ``error``'s message names the method or one of the settings given (a dotted key by its head too)."""
    message = str(error)
    names = {method, *given_settings, *(key.split(".")[0] for key in given_settings)}
    return any(name and name in message for name in names)


@pytest.mark.parametrize("method", sorted(vtexit.method_configs()))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_settings_are_refused_by_name_or_run(method, data):
    given_settings = draw_settings(data, method)
    case, inputs = llava()
    model = case.model
    try:
        config = vtexit.config_from_dict({"method": method, **given_settings})
    except (ValueError, TypeError) as err:
        event("refused by the config")
        assert named(err, method, given_settings), f"{type(err).__name__}: {err}"
        return
    as_json = json.dumps(config.to_dict())
    assert vtexit.config_from_dict(json.loads(as_json)) == config, as_json
    try:
        handle = vtexit.apply(model, config)
    except (ValueError, TypeError) as err:
        event("refused when applied")
        assert named(err, method, given_settings), f"{type(err).__name__}: {err}"
        assert vtexit.patch_of(model) is None
        return
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all(), config
        event("ran")
    finally:
        handle.remove()
    assert vtexit.patch_of(model) is None
