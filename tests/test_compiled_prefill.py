"""A compiled prefill under VTW keeps its savings without breaking the graph.

``torch.compile`` of the whole model: a batch-1 prefill plans the withdrawal from the pixel inputs' shapes while
tracing, so the patched model breaks into no more graphs than the unpatched one (counted with
``torch._dynamo.explain``; the unpatched model is the reference). The language model compiled alone with
``fullgraph=True`` runs the plan the eager core hook made. Every compiled result equals the eager patched model,
whose exactness the family suites check against hand-run layers.
"""

from __future__ import annotations

import pytest
import torch

import vtexit
from vtexit.core.transformers_compat import compiled_decode_config, forget_compiled_call
from vtexit.testing.tiny_models import build_tiny

NO_CACHE = dict(use_cache=False)


def _graphs(model, inputs: dict, **forward) -> tuple[int, int]:
    """(graphs, graph breaks) of ``torch.compile(model)`` on this call."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs, **forward)
    return explained.graph_count, explained.graph_break_count


def _compiled(model, inputs: dict, **forward):
    torch._dynamo.reset()
    return torch.compile(model, backend="aot_eager")(**inputs, **forward)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request):
    case = build_tiny(request.param, num_layers=4)
    case.model.generation_config.eos_token_id = None
    return case


@torch.no_grad()
def test_whole_model_compile_adds_no_graph_and_equals_eager(tiny):
    model, inputs = tiny.model, tiny.inputs([2], text_len=6)
    model(**inputs, **NO_CACHE)  # transformers installs its output hooks at the first call (under a lock)
    unpatched = _graphs(model, inputs, **NO_CACHE)
    with vtexit.withdraw(model, layer=2) as handle:
        eager = model(**inputs, **NO_CACHE).logits
        eager_tokens = handle.last_cost.tokens_per_layer()
        assert _graphs(model, inputs, **NO_CACHE) == unpatched
        compiled = _compiled(model, inputs, **NO_CACHE).logits
        compiled_tokens = handle.last_cost.tokens_per_layer()
    assert compiled.shape == eager.shape  # the compacted layers really ran on the text tokens only
    torch.testing.assert_close(compiled, eager)
    assert compiled_tokens.tolist() == eager_tokens.tolist()  # the cost record of what the compiled prefill ran
    text = int((~(inputs["input_ids"] == model.config.image_token_id)).sum())
    assert compiled_tokens[-1].tolist() == [text]


@torch.no_grad()
def test_compiled_prefill_with_padding_keeps_pad_slots_masked(tiny):
    """A left-padded row (a 2D mask with zeros): the traced plan keeps the pad slots as masked slots, and the real
    slots' logits equal the eager model's (which drops them)."""
    model = tiny.model
    inputs = tiny.inputs([1], text_len=6)
    pads = torch.zeros(1, 3, dtype=torch.long)  # three pad tokens (id 0, masked) on the left of every per-token input
    shape = inputs["input_ids"].shape
    inputs = {k: torch.cat([pads.to(v.dtype), v], 1) if v.shape == shape else v for k, v in inputs.items()}
    assert not inputs["attention_mask"].all()
    with vtexit.withdraw(model, layer=2) as handle:
        eager = model(**inputs, **NO_CACHE).logits
        compiled = _compiled(model, inputs, **NO_CACHE).logits
        layout = handle.last_layout
    torch.testing.assert_close(compiled[layout.valid], eager[0])


@torch.no_grad()
def test_compiled_prefill_refuses_a_prompt_ending_in_an_image(tiny):
    model = tiny.model
    inputs = tiny.inputs([1], text_len=4)
    last = int(tiny.media_mask(inputs).nonzero()[:, 1].max()) + 1  # cut after the image
    shape = inputs["input_ids"].shape
    inputs = {k: v[:, :last] if v.shape == shape else v for k, v in inputs.items()}
    with vtexit.withdraw(model, layer=2):
        with pytest.raises(ValueError, match="ends in a visual token"):
            model(**inputs, **NO_CACHE)
        with pytest.raises(RuntimeError, match="ends in a visual token"):
            _compiled(model, inputs, **NO_CACHE)


@torch.no_grad()
def test_calls_the_traced_plan_does_not_cover_stay_exact_under_compile():
    """Several rows, or a cache to fill: the eager hooks run (graph breaks), and the result equals eager."""
    case = build_tiny("llava", num_layers=4)
    model = case.model
    batch = case.inputs([1, 2], text_len=[5, 3])
    single = case.inputs([1], text_len=5)
    with vtexit.withdraw(model, layer=2):
        for inputs, forward in ((batch, NO_CACHE), (single, dict(use_cache=True))):
            eager = model(**inputs, **forward).logits
            torch.testing.assert_close(_compiled(model, inputs, **forward).logits, eager)


@torch.no_grad()
def test_language_model_compiled_with_fullgraph_runs_the_withdrawal():
    """Only the language model compiled, with ``fullgraph=True`` (any graph break raises): prefill and a cached
    generate equal the eager patched model."""
    case = build_tiny("llava", num_layers=4)
    model = case.model
    model.generation_config.eos_token_id = None
    inputs = case.inputs([2], text_len=6)
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    language_model = model.model.language_model
    with vtexit.withdraw(model, layer=2):
        eager = model(**inputs, **NO_CACHE).logits
        eager_tokens = model.generate(**inputs, **generate)
        torch._dynamo.reset()
        language_model.compile(fullgraph=True, backend="eager")
        try:
            compiled = model(**inputs, **NO_CACHE).logits
            compiled_tokens = model.generate(**inputs, **generate)
        finally:
            language_model._compiled_call_impl = None
            torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    assert compiled_tokens.tolist() == eager_tokens.tolist()


@torch.no_grad()
def test_whole_llava_compiles_to_one_graph_as_unpatched(monkeypatch):
    """With transformers' own data-dependent checks off (``TRANSFORMERS_DISABLE_TORCH_CHECK=1``, their production
    switch), the unpatched LLaVA compiles to one graph (5.23-5.25): so must the patched one, ``fullgraph=True``."""
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    case = build_tiny("llava", num_layers=4)
    model, inputs = case.model, case.inputs([1], text_len=6)
    model(**inputs, **NO_CACHE)
    unpatched = _graphs(model, inputs, **NO_CACHE)
    with vtexit.withdraw(model, layer=2):
        eager = model(**inputs, **NO_CACHE).logits
        assert _graphs(model, inputs, **NO_CACHE) == unpatched
        if unpatched != (1, 0):
            pytest.skip(f"this transformers release compiles the unpatched LLaVA to {unpatched[0]} graphs")
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs, **NO_CACHE).logits
    torch.testing.assert_close(compiled, eager)


def _cudagraph_blockers(run) -> tuple[int, list[str]]:
    """The forward graphs ``run(backend)`` compiles, and the ops in them that inductor's own check finds would keep
    CUDA graphs (``mode="reduce-overhead"``) off: data-dependent shapes and ops marked unsafe. The check reads the
    graph, not the device, so the CPU sees what a GPU would refuse; a graph break (an op run eagerly between graphs)
    shows as one more graph."""
    from torch._dynamo.backends.common import aot_autograd

    utils = pytest.importorskip("torch._inductor.utils")
    if not hasattr(utils, "get_first_incompatible_cudagraph_node"):
        pytest.skip("this torch has no get_first_incompatible_cudagraph_node")
    found, graphs = [], []

    def forward_compiler(gm, example_inputs):
        graphs.append(gm)
        node = utils.get_first_incompatible_cudagraph_node(gm)
        if node is not None:
            found.append(str(node.target))
        return gm.forward

    torch._dynamo.reset()
    try:
        run(aot_autograd(fw_compiler=forward_compiler))
    finally:
        torch._dynamo.reset()
    assert graphs, "nothing was compiled"
    return len(graphs), found


@torch.no_grad()
def test_compiled_prefill_and_static_decode_have_no_cuda_graph_blockers():
    """CUDA graphs need fixed shapes and no host reads: the traced batch-1 prefill and the static-cache decode step
    under VTW contain no op that would keep them off, as the unpatched model's graphs contain none
    (``tests/test_gpu.py`` runs both with CUDA graphs on a GPU)."""
    case = build_tiny("llava", num_layers=4)
    model = case.model
    model.generation_config.eos_token_id = None
    single, batch = case.inputs([1], text_len=6), case.inputs([1, 2], text_len=[5, 3])
    model(**single, **NO_CACHE)  # transformers installs its output hooks at the first call

    def prefill(backend):
        torch.compile(model, backend=backend)(**single, **NO_CACHE)

    def decode(backend):
        forget_compiled_call(model)
        model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static",
                       compile_config=compiled_decode_config(backend=backend))
        forget_compiled_call(model)

    unpatched = [_cudagraph_blockers(prefill), _cudagraph_blockers(decode)]
    with vtexit.withdraw(model, layer=2):
        patched = [_cudagraph_blockers(prefill), _cudagraph_blockers(decode)]
    assert patched == unpatched
    assert unpatched[1] == (1, [])  # transformers' decode step: one graph, nothing blocking CUDA graphs
    assert not unpatched[0][1]
