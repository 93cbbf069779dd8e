"""The speed benchmark's measurement code on the CPU (the GPU run uses the same code): every configuration is
measured, FLOPs come from the cost records, and impossible speedups are flagged."""

from __future__ import annotations

import math

import pytest
from reduced_prompt import keep_count

import vtexit
from vtexit.core.flops import DecoderShape, count
from vtexit.evaluation.speed import NOISE_MARGIN, SpeedRow, measure_speed, measure_static_decode, speed_ratios


def test_measure_speed_on_cpu(llava4):
    inputs = llava4.inputs([1, 1], text_len=[5, 5])
    rows = measure_speed(llava4.model, inputs, [2], repeats=1, new_tokens=3)
    assert [(r.mode, r.layer) for r in rows] == [("eager", None), ("eager", 2)]
    assert all(math.isfinite(r.prefill_s) and r.decode_token_s is not None for r in rows)
    shape = DecoderShape.from_model(llava4.model)
    media = llava4.media_mask(inputs)
    length, text = inputs["input_ids"].shape[1], int((~media[0]).sum())
    by_hand = 2 * count(shape, [length, length] + [text] * (shape.num_layers - 2)).prefill
    assert rows[1].prefill_flops == by_hand
    assert rows[0].prefill_flops == 2 * count(shape, [length] * shape.num_layers).prefill
    # KV bytes the dynamic cache holds after a 3-token generate (2 decode steps written), by hand: every layer holds
    # the prompt and 2 tokens unpatched; under K=2, layers 2.. hold the text and 2 tokens.
    config = llava4.model.config.get_text_config()
    per_slot = 2 * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # fp32
    n = config.num_hidden_layers
    assert rows[0].kv_bytes == n * (length + 2) * per_slot
    assert rows[1].kv_bytes == (2 * (length + 2) + (n - 2) * (text + 2)) * per_slot


def test_speedups_beyond_the_flops_bound_are_flagged():
    def row(layer, seconds, flops):
        return SpeedRow("eager", layer, seconds, None, None, flops)

    rows = speed_ratios([row(None, 1.0, 300), row(2, 0.5, 150), row(4, 0.2, 150)])
    assert [r["beyond_flops_bound"] for r in rows] == [False, False, True]
    assert rows[2]["efficiency"] > NOISE_MARGIN and abs(rows[1]["efficiency"] - 1.0) < 1e-9


def test_measure_static_decode_uses_transformers_compiled_decode(llava4):
    inputs = llava4.inputs([1, 1], text_len=[5, 5])
    methods = {"divprune keep=0.5": vtexit.DivPruneConfig(keep=0.5)}
    rows = measure_static_decode(llava4.model, inputs, [2], methods=methods, repeats=1, new_tokens=3)
    assert [(r.layer, r.method) for r in rows] == [(None, None), (2, None), (None, "divprune keep=0.5")]
    # A per-token time is a difference of two generates' times: with one repeat of 2 decode steps on a tiny model it
    # is within this machine's noise and may even come out negative, so only its presence is checked here.
    assert all(math.isfinite(r.decode_token_s) and r.peak_bytes is None and r.dynamic_peak_bytes is None for r in rows)
    # each configuration compiled its own decode: on the CPU inductor runs every compiled graph without CUDA graphs
    assert all(r.cudagraph_skips >= 1 for r in rows)
    # KV bytes held, by hand: every layer of the unpatched cache holds M slots; under VTW K=2 layers 2.. hold M less
    # the withdrawn slots (the prompt less its longest row's text).
    config = llava4.model.config.get_text_config()
    head_dim = config.hidden_size // config.num_attention_heads
    per_slot = inputs["input_ids"].shape[0] * 2 * config.num_key_value_heads * head_dim * 4  # k and v, fp32
    n = config.num_hidden_layers
    slots, rest = divmod(rows[0].kv_bytes, n * per_slot)
    assert rest == 0 and slots > inputs["input_ids"].shape[1]
    withdrawn = inputs["input_ids"].shape[1] - int((~llava4.media_mask(inputs)).sum(1).max())
    assert rows[1].kv_bytes == (n * slots - (n - 2) * withdrawn) * per_slot
    # DivPrune keeps each row's text and half its visual tokens (rounded half up) in every layer, layer 0 too.
    media = llava4.media_mask(inputs)
    kept = max(int((~media[b]).sum()) + keep_count(int(media[b].sum()), 0.5) for b in range(media.shape[0]))
    assert rows[2].kv_bytes == n * (slots - (inputs["input_ids"].shape[1] - kept)) * per_slot
    assert hasattr(llava4.model, "_compiled_call")  # generate compiled its decode step
    assert getattr(llava4.model, "_vtexit_engine", None) is None  # the caller's model was never patched


def test_measure_speed_compiled_whole_and_regional(llava4):
    inputs = llava4.inputs([1, 1], text_len=[5, 5])
    layers = llava4.model.model.language_model.layers
    rows = measure_speed(
        llava4.model, inputs, [2], repeats=1, new_tokens=2, compiled=True, compile_backend="eager",
        compile_mode=["whole", "regional"],
    )
    expected = [(mode, layer) for mode in ("eager", "compiled", "regional") for layer in (None, 2)]
    assert [(r.mode, r.layer) for r in rows] == expected
    for base, patched in zip(rows[::2], rows[1::2], strict=True):
        assert patched.prefill_flops == rows[1].prefill_flops < base.prefill_flops
    with pytest.raises(ValueError, match="compile_mode"):
        measure_speed(llava4.model, inputs, [2], compiled=True, compile_mode="max-autotune")
    assert all("forward" not in layer.__dict__ for layer in layers)  # the regional compile was undone
