"""The edge cases a user meets with a patched model: each ends in the right answer or a clear refusal.

References are independent of vtexit's engine: the unpatched model, no-cache recomputations, results computed in a
single thread, layers run by hand (tests/reference.py).
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from reference import greedy_no_cache, record_layer_inputs, withdrawn_logits
from torch.nn import functional as F

import vtexit
from vtexit.core.guards import has_media_inputs
from vtexit.core.transformers_compat import cache_kwargs, output_cache
from vtexit.testing.tiny_models import build_tiny


# ------------------------------------------------------------------------------------------- threads
@torch.no_grad()
def test_threads_share_one_patched_model(llava4):
    batches = [
        llava4.inputs([1], text_len=[6], seed=1),
        llava4.inputs([2, 0], text_len=[3, 7], seed=2),
        llava4.inputs([1, 1, 2], text_len=[5, 2, 4], seed=3),
    ]
    with vtexit.withdraw(llava4.model, layer=2) as handle:
        expected = [llava4.model(**b).logits for b in batches]
        layouts = []
        for b in batches:
            llava4.model(**b)
            layouts.append(handle.last_layout.index.clone())
        results: dict[tuple[int, int], bool] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(len(batches))

        def work(t: int) -> None:
            try:
                start.wait()
                for r in range(6):
                    logits = llava4.model(**batches[t]).logits
                    same_layout = torch.equal(handle.last_layout.index, layouts[t])
                    results[t, r] = torch.equal(logits, expected[t]) and same_layout
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert len(results) == 18 and all(results.values())


# ------------------------------------------------------------------------------------------- prompt shapes
@torch.no_grad()
def _cut_after_last_visual_token(llava4, inputs: dict) -> dict:
    last = int(llava4.media_mask(inputs).any(0).nonzero().max()) + 1
    return dict(inputs, input_ids=inputs["input_ids"][:, :last], attention_mask=inputs["attention_mask"][:, :last])


def test_prompt_ending_in_visual_tokens_is_refused(llava4):
    ends_in_image = _cut_after_last_visual_token(llava4, llava4.inputs([1, 1], text_len=[4, 4]))
    only_image = _cut_after_last_visual_token(llava4, llava4.inputs([1], text_len=[1]))
    assert llava4.media_mask(only_image).all()
    with vtexit.withdraw(llava4.model, layer=2):
        for inputs in (ends_in_image, only_image):
            with pytest.raises(ValueError, match="ends in a visual token"):
                llava4.model(**inputs)
            with pytest.raises(ValueError, match="ends in a visual token"):
                llava4.model.generate(**inputs, max_new_tokens=2)


@torch.no_grad()
def test_a_call_refused_mid_forward_records_nothing(llava4):
    """The end-of-prompt check rides in the first compaction event's read, inside the forward: the refused call must
    leave the previous call's layout and cost in place, not its half-run compaction."""
    good = llava4.inputs([1], text_len=[4])
    ends_in_image = _cut_after_last_visual_token(llava4, llava4.inputs([1, 1], text_len=[4, 4]))
    with vtexit.withdraw(llava4.model, layer=2) as handle:
        llava4.model(**good)
        layout, cost = handle.last_layout, handle.last_cost
        with pytest.raises(ValueError, match="ends in a visual token"):
            llava4.model(**ends_in_image)
        assert handle.last_layout is layout and handle.last_cost is cost


@torch.no_grad()
def test_prompt_ending_in_visual_tokens_under_in_layer_pruning_is_refused(llava4):
    """Windowed attention changes visual rows from the first layer on, with no compaction event: the prompt is
    checked in the prefill's own read."""
    ends_in_image = _cut_after_last_visual_token(llava4, llava4.inputs([1, 1], text_len=[4, 4]))
    with vtexit.yopo(llava4.model, vtexit.YOPOConfig(window=3)):
        with pytest.raises(ValueError, match="ends in a visual token"):
            llava4.model(**ends_in_image)


@torch.no_grad()
def test_visual_tokens_without_pixel_inputs_are_refused(llava4):
    """The model would read image tokens without pixels as text embeddings: refused, not run silently."""
    inputs = llava4.inputs([1, 1], text_len=[4, 4])
    without_pixels = {k: v for k, v in inputs.items() if not has_media_inputs({k: v})}
    assert "pixel_values" in inputs and "pixel_values" not in without_pixels
    with vtexit.withdraw(llava4.model, layer=2):
        with pytest.raises(ValueError, match="no pixel inputs"):
            llava4.model(**without_pixels)
        with pytest.raises(ValueError, match="no pixel inputs"):
            llava4.model.generate(**without_pixels, max_new_tokens=2)
    with pytest.raises(ValueError, match="no pixel inputs"):
        vtexit.calibrate(llava4.model, [without_pixels], progress=False)


@torch.no_grad()
def test_prompt_ending_in_visual_tokens_runs_untouched_when_nothing_is_withdrawn(llava4):
    """At K = N no token leaves, so the last token's prediction is the unpatched one and nothing is refused."""
    ends_in_image = _cut_after_last_visual_token(llava4, llava4.inputs([1, 1], text_len=[4, 4]))
    expected = llava4.model(**ends_in_image).logits
    with vtexit.withdraw(llava4.model, layer=llava4.model.config.text_config.num_hidden_layers):
        assert torch.equal(llava4.model(**ends_in_image).logits, expected)


def _right_padded(llava4, short: dict, long: dict) -> dict:
    """Two one-row batches stacked, the shorter padded on the right."""
    pad = long["input_ids"].shape[1] - short["input_ids"].shape[1]
    return dict(
        input_ids=torch.cat([F.pad(short["input_ids"], (0, pad)), long["input_ids"]]),
        attention_mask=torch.cat([F.pad(short["attention_mask"], (0, pad)), long["attention_mask"]]),
        pixel_values=torch.cat([short["pixel_values"], long["pixel_values"]]),
    )


@torch.no_grad()
def test_right_padded_rows_are_checked_at_their_last_real_token(llava4):
    """The last column is padding for a right-padded row, so its last real token is found by position."""
    long = llava4.inputs([1], text_len=[6])
    ends_in_image = _right_padded(llava4, _cut_after_last_visual_token(llava4, llava4.inputs([1], text_len=[1])), long)
    ends_in_text = _right_padded(llava4, llava4.inputs([1], text_len=[2]), long)
    with vtexit.withdraw(llava4.model, layer=2):
        with pytest.raises(ValueError, match="ends in a visual token"):
            llava4.model(**ends_in_image)
        llava4.model(**ends_in_text)


class _DropAllButLast(vtexit.Policy):
    """Asks to drop every slot before layer 2; the engine must still keep each row's last prompt token."""

    def keep(self, view):
        return torch.zeros_like(view.layout.valid) if view.layer_idx == 2 else None


@torch.no_grad()
def test_last_prompt_token_survives_any_drop(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    seen = record_layer_inputs(llava4.model, inputs)
    engine = vtexit.ScheduleEngine(llava4.model, _DropAllButLast())
    engine.attach()
    handle = vtexit.PatchHandle(engine)
    with handle:
        logits = llava4.model(**inputs).logits
        layout = handle.last_layout
    last = inputs["input_ids"].shape[1] - 1
    assert layout.index[:, -1].tolist() == [last, last] and layout.valid.sum(1).tolist() == [1, 1]
    for b in range(2):
        expected = withdrawn_logits(llava4.model, seen, b, torch.tensor([last]), 2)
        torch.testing.assert_close(logits[b, -1:], expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_last_layout_resets_after_a_text_only_call(llava4):
    with vtexit.withdraw(llava4.model, layer=2) as handle:
        llava4.model(**llava4.inputs([1], text_len=[4]))
        assert handle.last_layout is not None
        llava4.model(**llava4.inputs([0], text_len=[4]))
        assert handle.last_layout is None


# ------------------------------------------------------------------------------------------- caches
@torch.no_grad()
@pytest.mark.parametrize("layer", [2, 4])
def test_continuing_generation_with_more_text(llava4, layer):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    more = torch.randint(*llava4.text_id_range, (2, 3), generator=torch.Generator().manual_seed(5))
    gen = dict(do_sample=False, return_dict_in_generate=True)

    def run():
        first = llava4.model.generate(**inputs, max_new_tokens=3, **gen)
        ids = torch.cat([first.sequences, more], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1] :])], dim=1)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        again = llava4.model.generate(
            input_ids=ids,
            attention_mask=mask,
            **cache_kwargs(llava4.model, output_cache(first)),
            max_new_tokens=3,
            **gen,
        )
        return again.sequences, ids, mask, rest

    with vtexit.withdraw(llava4.model, layer=layer):
        continued, ids, mask, rest = run()
        expected = greedy_no_cache(llava4.model, rest, 3, ids=ids, mask=mask)
    assert torch.equal(continued, expected)
    if layer == 4:  # K = N: exactly the unpatched continuation
        unpatched, *_ = run()
        assert torch.equal(continued, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("rows", [[1], [2, 0]], ids=["batch1", "padded"])
def test_older_cache_continued_after_another_prefill(llava4, rows):
    first = llava4.inputs(rows, text_len=[4, 7][: len(rows)], seed=11)
    other = llava4.inputs([1, 1, 1], text_len=[2, 3, 4], seed=12)
    token = torch.full((len(rows), 1), llava4.text_id_range[0] + 3)
    with vtexit.withdraw(llava4.model, layer=2):
        cache = output_cache(llava4.model(**first, use_cache=True))
        llava4.model(**other, use_cache=True)  # another prefill on the same handle
        mask = torch.cat([first["attention_mask"], torch.ones_like(token)], dim=1)
        step = llava4.model(input_ids=token, attention_mask=mask, **cache_kwargs(llava4.model, cache)).logits[:, -1]
        ids = torch.cat([first["input_ids"], token], dim=1)
        expected = llava4.model(**dict(first, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_cache_filled_while_patched_is_refused_after_remove(llava4):
    inputs = llava4.inputs([1], text_len=[4])
    with vtexit.withdraw(llava4.model, layer=2):
        cache = output_cache(llava4.model(**inputs, use_cache=True))
    token = torch.full((1, 1), llava4.text_id_range[0])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    with pytest.raises(ValueError, match="patch has been removed"):
        llava4.model(input_ids=token, attention_mask=mask, **cache_kwargs(llava4.model, cache))


def _chunks_see_media(model, call) -> bool:
    """Whether any forward of ``call()`` received media inputs (generate's chunked prefill passes them, or their
    encoded features, to the chunks in transformers 5.23+, and none to any chunk in 5.17, where the model never sees
    the image)."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(has_media_inputs(kw)), with_kwargs=True)
    try:
        call()
    finally:
        hook.remove()
    return any(seen)


@torch.no_grad()
def test_chunked_prefill(llava4):
    """Refused when a chunk brings media to a non-empty cache, or ends inside an image. Where this release's generate
    gives the chunks no media inputs (5.17) and the image lies wholly in a later chunk, the model never sees the
    image, there is nothing to withdraw, and the patched model gives the unpatched tokens."""
    model = llava4.model
    late_image = llava4.inputs([1], text_len=[12])  # 6 text tokens, then the image: the image is past chunk 1
    media = llava4.media_mask(late_image)[0]
    inside = int(media.nonzero().min()) + int(media.sum()) // 2
    for chunk in (4, inside):  # the image after chunk 1; a chunk that ends inside the image

        def run(chunk=chunk):
            return model.generate(**late_image, max_new_tokens=2, prefill_chunk_size=chunk)

        if chunk == 4 and not _chunks_see_media(model, run):
            expected = run()
            with vtexit.withdraw(model, layer=2):
                assert torch.equal(run(), expected)
        else:
            with vtexit.withdraw(model, layer=2), pytest.raises(ValueError, match="chunked prefill"):
                run()


# ------------------------------------------------------------------------------------------- copies, pickling
@torch.no_grad()
def test_deepcopy_of_a_patched_model_has_its_own_patch(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    base = llava4.model(**inputs).logits
    with vtexit.withdraw(llava4.model, layer=2):
        patched = llava4.model(**inputs).logits
        twin = copy.deepcopy(llava4.model)
        assert torch.equal(twin(**inputs).logits, patched)
        twin_handle = vtexit.patch_of(twin)
        assert twin_handle is not None and twin_handle.engine.model is twin
    assert torch.equal(llava4.model(**inputs).logits, base)  # the original's patch is gone
    assert torch.equal(twin(**inputs).logits, patched)  # the copy's is not
    twin_handle.remove()
    assert torch.equal(twin(**inputs).logits, base)
    assert vtexit.patch_of(twin) is None


def test_torch_save_of_a_patched_model_says_remove_first(llava4):
    with vtexit.withdraw(llava4.model, layer=2):
        with pytest.raises(ValueError, match="remove"):
            torch.save(llava4.model, io.BytesIO())
    torch.save(llava4.model.state_dict(), io.BytesIO())


# ------------------------------------------------------------------------------------------- compile
@torch.no_grad()
def test_torch_compile_before_and_after_patching(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    base = llava4.model(**inputs).logits
    with vtexit.withdraw(llava4.model, layer=2):
        patched = llava4.model(**inputs).logits
    compiled = torch.compile(llava4.model, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits, base)
    with pytest.raises(ValueError, match="_orig_mod"):
        vtexit.withdraw(compiled, layer=2)
    with vtexit.withdraw(llava4.model, layer=2):  # compiled before patching
        torch.testing.assert_close(compiled(**inputs).logits, patched)
    torch.testing.assert_close(compiled(**inputs).logits, base)  # and after remove()
    with vtexit.withdraw(llava4.model, layer=2):  # compiled after patching
        later = torch.compile(llava4.model, backend="eager")
        torch.testing.assert_close(later(**inputs).logits, patched)
    torch.testing.assert_close(later(**inputs).logits, base)
    torch._dynamo.reset()


@torch.no_grad()
def test_regional_compilation_of_the_decoder_layers_is_exact():
    """``layer.compile()`` on every decoder layer (regional compilation, aot_eager here to stay fast): VTW and YOPO
    give the eager logits and greedy tokens, with the dynamic and the static cache; the hooks and replaced forwards
    run eagerly between compiled regions (static decode steps trace the hooks' mask path into the regions)."""
    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    model, layers = case.model, case.model.model.language_model.layers
    inputs = case.inputs([1, 0, 2], text_len=[5, 9, 3])
    media_ids = sorted(set(inputs["input_ids"][case.media_mask(inputs)].tolist()))
    generate = dict(max_new_tokens=4, do_sample=False, suppress_tokens=media_ids)
    active = torch.ones(4, model.config.text_config.num_attention_heads, dtype=torch.bool)
    active[2:, ::2] = False
    configs = [vtexit.VTWConfig(layer=2), vtexit.YOPOConfig(window=3, heads=active, layer_drop=3, ffn_ratio=2)]
    expected = []
    for config in configs:
        with vtexit.apply(model, config):
            expected.append((model(**inputs).logits, model.generate(**inputs, **generate)))
    for layer in layers:
        layer.compile(backend="aot_eager")
    try:
        for config, (logits, tokens) in zip(configs, expected, strict=True):
            with vtexit.apply(model, config):
                torch.testing.assert_close(model(**inputs).logits, logits, atol=1e-6, rtol=1e-6)
                assert torch.equal(model.generate(**inputs, **generate), tokens)
                assert torch.equal(model.generate(**inputs, cache_implementation="static", **generate), tokens)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- labels
def test_labels_while_patched_give_the_loss_on_kept_positions(llava4):
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    media = llava4.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    first = real.long().argmax(1)
    # -100 on media, padding and each row's first token: transformers also scores the first token as predicted
    # from the last left pad, which vtexit (ignoring pad slots) does not.
    labels = inputs["input_ids"].masked_fill(media | ~real, -100)
    labels[torch.arange(2), first] = -100
    with torch.no_grad():
        unpatched = llava4.model(**inputs, labels=labels).loss
        with vtexit.withdraw(llava4.model, layer=4):
            assert torch.allclose(llava4.model(**inputs, labels=labels).loss, unpatched, atol=1e-6)
        seen = record_layer_inputs(llava4.model, inputs)
    with vtexit.withdraw(llava4.model, layer=2):
        out = llava4.model(**inputs, labels=labels)
    out.loss.backward()  # the loss trains: gradients reach the model
    assert llava4.model.lm_head.weight.grad is not None
    llava4.model.zero_grad(set_to_none=True)
    # By hand: each kept text position predicts the next original token.
    losses = []
    for b in range(2):
        text = (inputs["attention_mask"][b].bool() & ~media[b]).nonzero().squeeze(1)
        logits = withdrawn_logits(llava4.model, seen, b, text, 2)
        targets = torch.tensor([labels[b, p + 1].item() if p + 1 < labels.shape[1] else -100 for p in text.tolist()])
        losses.append((F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), (targets != -100).sum()))
    expected = sum(s for s, _ in losses) / sum(n for _, n in losses)
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_labels_under_torch_compile_give_the_eager_loss(llava4):
    """Under torch.compile the labels hooks run eagerly (a graph break) once labels were seen; calls without labels
    around them still return no loss."""
    inputs = llava4.inputs([1, 2], text_len=[5, 3])
    labels = inputs["input_ids"].masked_fill(llava4.media_mask(inputs) | ~inputs["attention_mask"].bool(), -100)
    with vtexit.withdraw(llava4.model, layer=2):
        expected = llava4.model(**inputs, labels=labels).loss
        compiled = torch.compile(llava4.model, backend="eager")
        try:
            assert compiled(**inputs).loss is None
            torch.testing.assert_close(compiled(**inputs, labels=labels).loss, expected, atol=1e-6, rtol=1e-6)
            assert compiled(**inputs).loss is None
            torch.testing.assert_close(compiled(**inputs, labels=labels).loss, expected, atol=1e-6, rtol=1e-6)
        finally:
            torch._dynamo.reset()
