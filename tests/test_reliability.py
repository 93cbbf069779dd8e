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
from reference import record_layer_inputs, withdrawn_logits
from torch.nn import functional as F

import vtexit
from vtexit.testing.tiny_models import build_tiny


@pytest.fixture(scope="module")
def llava():
    case = build_tiny("llava", num_layers=4)
    case.model.generation_config.eos_token_id = None
    case.model.generation_config.pad_token_id = 0
    return case


def _greedy_no_cache(model, inputs: dict, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full recomputation (no cache) from the sequence ``ids``."""
    for _ in range(steps):
        logits = model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


# ------------------------------------------------------------------------------------------- threads
@torch.no_grad()
def test_threads_share_one_patched_model(llava):
    batches = [
        llava.inputs([1], text_len=[6], seed=1),
        llava.inputs([2, 0], text_len=[3, 7], seed=2),
        llava.inputs([1, 1, 2], text_len=[5, 2, 4], seed=3),
    ]
    with vtexit.withdraw(llava.model, layer=2) as handle:
        expected = [llava.model(**b).logits for b in batches]
        layouts = []
        for b in batches:
            llava.model(**b)
            layouts.append(handle.last_layout.index.clone())
        results: dict[tuple[int, int], bool] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(len(batches))

        def work(t: int) -> None:
            try:
                start.wait()
                for r in range(6):
                    logits = llava.model(**batches[t]).logits
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
def _cut_after_last_visual_token(llava, inputs: dict) -> dict:
    last = int(llava.media_mask(inputs).any(0).nonzero().max()) + 1
    return dict(inputs, input_ids=inputs["input_ids"][:, :last], attention_mask=inputs["attention_mask"][:, :last])


def test_prompt_ending_in_visual_tokens_is_refused(llava):
    ends_in_image = _cut_after_last_visual_token(llava, llava.inputs([1, 1], text_len=[4, 4]))
    only_image = _cut_after_last_visual_token(llava, llava.inputs([1], text_len=[1]))
    assert llava.media_mask(only_image).all()
    with vtexit.withdraw(llava.model, layer=2):
        for inputs in (ends_in_image, only_image):
            with pytest.raises(ValueError, match="ends in a visual token"):
                llava.model(**inputs)
            with pytest.raises(ValueError, match="ends in a visual token"):
                llava.model.generate(**inputs, max_new_tokens=2)


class _DropAllButLast(vtexit.Policy):
    """Asks to drop every slot before layer 2; the engine must still keep each row's last prompt token."""

    def keep(self, view):
        return torch.zeros_like(view.layout.valid) if view.layer_idx == 2 else None


@torch.no_grad()
def test_last_prompt_token_survives_any_drop(llava):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    seen = record_layer_inputs(llava.model, inputs)
    engine = vtexit.ScheduleEngine(llava.model, _DropAllButLast())
    engine.attach()
    handle = vtexit.PatchHandle(engine)
    with handle:
        logits = llava.model(**inputs).logits
        layout = handle.last_layout
    last = inputs["input_ids"].shape[1] - 1
    assert layout.index[:, -1].tolist() == [last, last] and layout.valid.sum(1).tolist() == [1, 1]
    for b in range(2):
        expected = withdrawn_logits(llava.model, seen, b, torch.tensor([last]), 2)
        torch.testing.assert_close(logits[b, -1:], expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_last_layout_resets_after_a_text_only_call(llava):
    with vtexit.withdraw(llava.model, layer=2) as handle:
        llava.model(**llava.inputs([1], text_len=[4]))
        assert handle.last_layout is not None
        llava.model(**llava.inputs([0], text_len=[4]))
        assert handle.last_layout is None


# ------------------------------------------------------------------------------------------- caches
@torch.no_grad()
@pytest.mark.parametrize("layer", [2, 4])
def test_continuing_generation_with_more_text(llava, layer):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    more = torch.randint(*llava.text_id_range, (2, 3), generator=torch.Generator().manual_seed(5))
    gen = dict(do_sample=False, return_dict_in_generate=True)

    def run():
        first = llava.model.generate(**inputs, max_new_tokens=3, **gen)
        ids = torch.cat([first.sequences, more], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1] :])], dim=1)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        again = llava.model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=3, **gen
        )
        return again.sequences, ids, mask, rest

    with vtexit.withdraw(llava.model, layer=layer):
        continued, ids, mask, rest = run()
        expected = _greedy_no_cache(llava.model, rest | {"pixel_values": inputs["pixel_values"]}, ids, mask, 3)
    assert torch.equal(continued, expected)
    if layer == 4:  # K = N: exactly the unpatched continuation
        unpatched, *_ = run()
        assert torch.equal(continued, unpatched)


@torch.no_grad()
@pytest.mark.parametrize("rows", [[1], [2, 0]], ids=["batch1", "padded"])
def test_older_cache_continued_after_another_prefill(llava, rows):
    first = llava.inputs(rows, text_len=[4, 7][: len(rows)], seed=11)
    other = llava.inputs([1, 1, 1], text_len=[2, 3, 4], seed=12)
    token = torch.full((len(rows), 1), llava.text_id_range[0] + 3)
    with vtexit.withdraw(llava.model, layer=2):
        cache = llava.model(**first, use_cache=True).past_key_values
        llava.model(**other, use_cache=True)  # another prefill on the same handle
        mask = torch.cat([first["attention_mask"], torch.ones_like(token)], dim=1)
        step = llava.model(input_ids=token, attention_mask=mask, past_key_values=cache).logits[:, -1]
        ids = torch.cat([first["input_ids"], token], dim=1)
        expected = llava.model(**dict(first, input_ids=ids, attention_mask=mask), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_cache_filled_while_patched_is_refused_after_remove(llava):
    inputs = llava.inputs([1], text_len=[4])
    with vtexit.withdraw(llava.model, layer=2):
        cache = llava.model(**inputs, use_cache=True).past_key_values
    token = torch.full((1, 1), llava.text_id_range[0])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    with pytest.raises(ValueError, match="patch has been removed"):
        llava.model(input_ids=token, attention_mask=mask, past_key_values=cache)


@torch.no_grad()
def test_chunked_prefill(llava):
    late_image = llava.inputs([1], text_len=[12])  # 6 text tokens, then the image: the image is past chunk 1
    with vtexit.withdraw(llava.model, layer=2):
        with pytest.raises(ValueError, match="chunked prefill"):
            llava.model.generate(**late_image, max_new_tokens=2, prefill_chunk_size=4)
        media = llava.media_mask(late_image)[0]
        inside = int(media.nonzero().min()) + int(media.sum()) // 2
        with pytest.raises(ValueError, match="chunked prefill"):  # a chunk that ends inside the image
            llava.model.generate(**late_image, max_new_tokens=2, prefill_chunk_size=inside)


# ------------------------------------------------------------------------------------------- copies, pickling
@torch.no_grad()
def test_deepcopy_of_a_patched_model_has_its_own_patch(llava):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    base = llava.model(**inputs).logits
    with vtexit.withdraw(llava.model, layer=2):
        patched = llava.model(**inputs).logits
        twin = copy.deepcopy(llava.model)
        assert torch.equal(twin(**inputs).logits, patched)
        twin_handle = vtexit.patch_of(twin)
        assert twin_handle is not None and twin_handle.engine.model is twin
    assert torch.equal(llava.model(**inputs).logits, base)  # the original's patch is gone
    assert torch.equal(twin(**inputs).logits, patched)  # the copy's is not
    twin_handle.remove()
    assert torch.equal(twin(**inputs).logits, base)
    assert vtexit.patch_of(twin) is None


def test_torch_save_of_a_patched_model_says_remove_first(llava):
    with vtexit.withdraw(llava.model, layer=2):
        with pytest.raises(ValueError, match="remove"):
            torch.save(llava.model, io.BytesIO())
    torch.save(llava.model.state_dict(), io.BytesIO())


# ------------------------------------------------------------------------------------------- compile
@torch.no_grad()
def test_torch_compile_before_and_after_patching(llava):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    base = llava.model(**inputs).logits
    with vtexit.withdraw(llava.model, layer=2):
        patched = llava.model(**inputs).logits
    compiled = torch.compile(llava.model, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits, base)
    with pytest.raises(ValueError, match="_orig_mod"):
        vtexit.withdraw(compiled, layer=2)
    with vtexit.withdraw(llava.model, layer=2):  # compiled before patching
        torch.testing.assert_close(compiled(**inputs).logits, patched)
    torch.testing.assert_close(compiled(**inputs).logits, base)  # and after remove()
    with vtexit.withdraw(llava.model, layer=2):  # compiled after patching
        later = torch.compile(llava.model, backend="eager")
        torch.testing.assert_close(later(**inputs).logits, patched)
    torch.testing.assert_close(later(**inputs).logits, base)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- labels
def test_labels_while_patched_give_the_loss_on_kept_positions(llava):
    inputs = llava.inputs([1, 2], text_len=[5, 3])
    media = llava.media_mask(inputs)
    real = inputs["attention_mask"].bool()
    first = real.long().argmax(1)
    # -100 on media, padding and each row's first token: transformers also scores the first token as predicted
    # from the last left pad, which vtexit (ignoring pad slots) does not.
    labels = inputs["input_ids"].masked_fill(media | ~real, -100)
    labels[torch.arange(2), first] = -100
    with torch.no_grad():
        unpatched = llava.model(**inputs, labels=labels).loss
        with vtexit.withdraw(llava.model, layer=4):
            assert torch.allclose(llava.model(**inputs, labels=labels).loss, unpatched, atol=1e-6)
        seen = record_layer_inputs(llava.model, inputs)
    with vtexit.withdraw(llava.model, layer=2):
        out = llava.model(**inputs, labels=labels)
    out.loss.backward()  # the loss trains: gradients reach the model
    assert llava.model.lm_head.weight.grad is not None
    llava.model.zero_grad(set_to_none=True)
    # By hand: each kept text position predicts the next original token.
    losses = []
    for b in range(2):
        text = (inputs["attention_mask"][b].bool() & ~media[b]).nonzero().squeeze(1)
        logits = withdrawn_logits(llava.model, seen, b, text, 2)
        targets = torch.tensor([labels[b, p + 1].item() if p + 1 < labels.shape[1] else -100 for p in text.tolist()])
        losses.append((F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), (targets != -100).sum()))
    expected = sum(s for s, _ in losses) / sum(n for _, n in losses)
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
