"""The schedule engine: applies a method's compaction events inside an unmodified transformers model.

Methods decide *which* positions each row keeps and *when* (a :class:`~vtexit.core.policy.Policy`); the engine
does the mechanics with forward pre-hooks, so no model forward is copied:

* a hook on the multimodal core decides the mode of each call: ``prefill`` (media tokens, empty cache),
  ``decode`` (a cache this engine filled), or off;
* a hook on every decoder layer gathers ``hidden_states`` at an event and rewrites the sequence-aligned kwargs
  the text model computed once for all layers (rotary cos/sin, position ids, attention mask). Kept tokens keep
  their original positions unless the policy renumbers them.

State of a call lives in a thread-local slot, and what decode needs from a prefill lives in a record keyed by the
cache it filled: several threads may run one patched model, and an older cache can be continued after another
prefill. Nothing is global, so differently patched models work side by side.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from vtexit.core.attention_scores import check_supported, query_attention, rotated_keys
from vtexit.core.call_state import (
    CallState,
    DecodeCostInputs,
    PrefillCostInputs,
    PrefillRecord,
    Stage,
    decode_key_padding,
)
from vtexit.core.compiled import eager_under_compile as _eager
from vtexit.core.compiled import forget_compiled_graphs
from vtexit.core.costs import CallCost, RunCost
from vtexit.core.families import FamilySpec, ResolvedFamily, family_for
from vtexit.core.guards import copy_removable_handle, has_media_inputs, poison, refuse_compiled
from vtexit.core.host_read import read_checks
from vtexit.core.layout import Layout, gather_sequence
from vtexit.core.loss import kept_positions_loss
from vtexit.core.masks import layer_types, media_block_ids, rebuild_mask
from vtexit.core.policy import PREFILL_CHECKS, Policy, PrefillView
from vtexit.core.static_cache import (
    StaticPlan,
    attach_plan,
    build_plan,
    check_static_cache,
    drop_plan,
    full_max_length,
    is_static,
    padding_from_prepared,
    plan_of,
    size_compacted_layer,
)
from vtexit.core.torch_support import check_tested_torch
from vtexit.core.transformers_compat import (
    Cache,
    check_tested_version,
    find_cache,
    forget_compiled_call,
    static_layer_length,
    with_cache,
)


class ScheduleEngine:
    """Attaches a :class:`Policy` to a model. Use :meth:`attach`/:meth:`detach` (or a method's handle)."""

    def __init__(self, model: nn.Module, policy: Policy | None, family: FamilySpec | None = None):
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a vtexit.Policy (subclass it), got {type(policy).__name__}")
        self.model = model
        self.policy = policy if policy is not None else Policy()
        self.family = family or family_for(model)
        self.parts: ResolvedFamily = self.family.resolve(model)
        self.text_config = model.config.get_text_config()
        self.layer_types = layer_types(self.text_config)
        self.min_layer = max(1, self.family.min_layer(model.config))
        self._media_token_ids = list(self.family.media_token_ids(model.config))
        if not self._media_token_ids:
            raise ValueError(
                f"model config has none of the media token id attributes {list(self.family.media_token_attrs)}; "
                "vtexit needs them to find the visual tokens"
            )
        self._event_layers = None if self.policy.event_layers is None else frozenset(self.policy.event_layers)
        self._media_ids: dict[torch.device, torch.Tensor] = {}
        self._full_index: tuple[tuple, torch.Tensor] | None = None  # the last prefill's positions, reused
        self.handle = None  # set by the PatchHandle that owns this engine
        self._handles: list[Any] = []
        self._replaced: list[nn.Module] = []
        self._init_runtime_state()

    def _init_runtime_state(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._records: weakref.WeakKeyDictionary[Cache, PrefillRecord] = weakref.WeakKeyDictionary()
        self._labels_under_compile = False

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    # ----------------------------------------------------------------------------------------- per-thread state
    @property
    def _call(self) -> CallState | None:
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, value: CallState | None) -> None:
        self._local.call = value

    @property
    def last_layout(self) -> Layout | None:
        """Slots of the last call in this thread: logits line up with them. None after a call nothing changed."""
        return getattr(self._local, "last_layout", None)

    @property
    def last_policy_state(self) -> dict:
        """What the policy kept in ``view.state`` during the last prefill in this thread."""
        return getattr(self._local, "last_policy_state", {})

    @property
    def last_cost(self) -> RunCost | None:
        """Cost record of the last prefill in this thread and of the decode steps that continued it."""
        return getattr(self._local, "last_cost", None)

    # ----------------------------------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if getattr(self.model, "_vtexit_engine", None) is not None:
            raise ValueError(
                "model is already patched by vtexit; call .remove() on the first handle before patching again"
            )
        refuse_compiled(self.model)
        check_tested_version()
        check_tested_torch()
        self.check_policy()
        for name, module in self.policy.modules().items():
            if not isinstance(module, nn.Module):
                raise ValueError(f"policy module {name!r} is a {type(module).__name__}, expected an nn.Module")
        replacements = self.policy.replacements(self)
        for module in replacements:
            if "forward" in module.__dict__:
                raise ValueError(f"{type(module).__name__}.forward is already replaced on this instance")
        # Everything that can refuse is resolved before the first hook, so a refusal leaves the model untouched.
        watched = set(self.policy.attention_layers) | set(self.policy.key_layers)
        attention_modules = [(i, self.attention_module(i)) for i in sorted(watched)]
        hooks = self._handles
        hooks.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        hooks.append(self.model.register_forward_hook(self._top_post_hook, always_call=True))
        hooks.append(self.parts.core.register_forward_pre_hook(self._core_pre_hook, with_kwargs=True))
        hooks.append(
            self.parts.core.register_forward_hook(self._core_post_hook, with_kwargs=True, always_call=True)
        )
        for i, layer in enumerate(self.parts.layers[self._first_hooked_layer() :], start=self._first_hooked_layer()):
            hooks.append(layer.register_forward_pre_hook(partial(self._layer_pre_hook, i), with_kwargs=True))
        for i, attention in attention_modules:
            hooks.append(attention.register_forward_pre_hook(partial(self._attention_hook, i), with_kwargs=True))
        for module, forward in replacements.items():
            # A partial (not a bound method) so that copy.deepcopy of the model copies the forward's owner too.
            module.forward = partial(forward, module)
            self._replaced.append(module)
        hooks.extend(self.policy.outer_hooks(self.model))
        self.model._vtexit_engine = self
        forget_compiled_call(self.model)  # a deep copy's may still run the model it was copied from
        forget_compiled_graphs()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._replaced:
            del module.forward
        self._replaced.clear()
        with self._lock:
            caches = [cache for cache, record in self._records.items() if record.compacted]
            self._records.clear()
        for cache in caches:
            drop_plan(cache)
            poison(cache)
        self._local = threading.local()
        if getattr(self.model, "_vtexit_engine", None) is self:
            del self.model._vtexit_engine
        forget_compiled_call(self.model)
        forget_compiled_graphs()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _first_hooked_layer(self) -> int:
        """Layers before the policy's first possible event run untouched, so they get no hook at all."""
        if self._event_layers is None:
            return min(self.min_layer, self.num_layers)
        return min([*self._event_layers, self.num_layers])

    def attention_module(self, layer_idx: int) -> nn.Module:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"attention layer must be in [0, {self.num_layers - 1}], got {layer_idx}")
        attention = getattr(self.parts.layers[layer_idx], self.family.attention, None)
        if attention is None:
            raise ValueError(f"decoder layer {layer_idx} has no attribute {self.family.attention!r}")
        check_supported(attention)
        return attention

    def check_policy(self) -> None:
        """Refuse, before anything is attached, a policy this model cannot run (ValueError saying why)."""
        early = sorted(i for i in self._event_layers or () if i < self.min_layer and not self._reduces_prompt(i))
        if early:
            raise ValueError(
                f"the policy's event_layers include {early}; this model needs layers 0..{self.min_layer - 1} to keep "
                "the full sequence (transformers sizes masks and positions from them)"
            )
        if self.policy.renumber_positions:
            rope = getattr(self.text_config, "rope_parameters", None) or {}
            rotary = getattr(self.parts.language_model, "rotary_emb", None)
            if "mrope_section" in rope or rotary is None:
                raise ValueError(
                    f"renumber_positions is not supported for {self.family.name}: it needs 1D rotary positions "
                    "(multimodal RoPE positions have no renumbering)"
                )
            if "layer_type" in inspect.signature(rotary.forward).parameters:
                raise ValueError(
                    f"renumber_positions is not supported for {self.family.name}: its rotary embedding depends on "
                    "the layer type"
                )

    def _reduces_prompt(self, layer_idx: int) -> bool:
        """An event before layer 0 shortens the prompt the language model sees (pre-LLM reduction). Allowed with
        renumbered positions (the kept tokens then sit where a shorter prompt would put them) on families whose
        masks and positions follow layer 0 alone (min layer 1: no hybrid attention, no deepstack)."""
        return layer_idx == 0 and self.policy.renumber_positions and self.min_layer == 1

    def __deepcopy__(self, memo: dict) -> ScheduleEngine:
        """A copied model keeps a working patch of its own: the engine is copied with the model's modules (the
        hooks in the copied modules point to the copy) and starts with no call state and no cache records."""
        new = ScheduleEngine.__new__(ScheduleEngine)
        memo[id(self)] = new
        skip = {"_local", "_lock", "_records", "_handles"}
        for key, value in self.__dict__.items():
            if key not in skip:
                setattr(new, key, copy.deepcopy(value, memo))
        new._init_runtime_state()
        new._handles = [copy_removable_handle(h, memo) for h in self._handles]
        return new

    def __reduce_ex__(self, protocol):
        raise ValueError(
            "a model patched by vtexit cannot be pickled (torch.save(model)): call handle.remove() first, or save "
            "model.state_dict(), which the patch does not change"
        )

    # ----------------------------------------------------------------------------------------- hooks
    # Each hook runs its eager body outside compilation. Under torch.compile, a decode step on a static cache this
    # patch filled takes a traceable path instead (no Python state, no graph break), so that transformers' compiled
    # decode stays one graph; every other call breaks the graph around the eager body.
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            if kwargs.get("labels") is None:
                return None
            self._labels_under_compile = True  # compiled post hooks call their eager body from now on
        return self._top_pre_hook_eager(module, args, kwargs)

    def _top_post_hook(self, module: nn.Module, args: tuple, output: Any):
        if torch.compiler.is_compiling() and not self._labels_under_compile:
            return None
        return self._top_post_hook_eager(module, args, output)

    @_eager
    def _top_pre_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict):
        self._local.labels = None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        self._local.labels = kwargs.pop("labels")
        return args, kwargs

    @_eager
    def _top_post_hook_eager(self, module: nn.Module, args: tuple, output: Any):
        labels, self._local.labels = getattr(self._local, "labels", None), None
        if labels is None or getattr(output, "logits", None) is None:
            return None
        output.loss = kept_positions_loss(output.logits, labels, getattr(self._local, "last_call_layout", None))
        return output

    def _static_decode_plan(self, kwargs: dict) -> StaticPlan | None:
        """The plan of a static cache this patch filled, when this call continues it (no media inputs)."""
        cache = find_cache(kwargs)
        if not is_static(cache):
            return None
        plan = plan_of(cache)
        if plan is None or plan.owner is not self or has_media_inputs(kwargs):
            return None
        return plan

    def _traced_decode_plan(self, kwargs: dict) -> StaticPlan | None:
        """Under compilation: the plan of a decode step that traces without Python state. Methods that replace layer
        forwards (YOPO's in-layer strategies) read per-call state in decode, so their steps take the eager hooks
        (graph breaks: exact, slower)."""
        plan = self._static_decode_plan(kwargs)
        if plan is None or (self._replaced and plan.record is not None):
            return None
        return plan

    def _core_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if torch.compiler.is_compiling():
            plan = self._traced_decode_plan(kwargs)
            if plan is not None:
                return _static_decode_positions(plan, args, kwargs)
            if self._traced_prefill(args, kwargs):
                return None
        return self._core_pre_hook_eager(module, args, kwargs)

    def _core_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.compiler.is_compiling():
            if self._traced_decode_plan(kwargs) is not None:
                return None
            call = self._call
            if call is not None and call.traced:
                self._call = None
                self._finish_prefill(call)
                return None
        return self._core_post_hook_eager(module, args, kwargs, output)

    def _layer_pre_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            plan = self._traced_decode_plan(kwargs)
            if plan is not None:
                return self._static_decode_layer(plan, layer_idx, args, kwargs, memo=None)
            call = self._call
            if call is not None and call.traced and call.planned is None:
                self._plan_traced_prefill(call)
            if call is not None and call.planned is not None:  # no host read and no Python-only state: traceable
                return self._prefill_layer(layer_idx, call, args, kwargs)
            if call is not None and call.mode == "decode" and not self._replaced:  # the core hook ran eagerly
                return self._decode_layer(layer_idx, call, args, kwargs)
        return self._layer_pre_hook_eager(layer_idx, module, args, kwargs)

    @property
    def _planned_withdrawal(self) -> int | None:
        """The layer before which every media slot leaves, when the policy's schedule is planned from the prompt."""
        layer = self.policy.withdraw_media_at
        return None if self._replaced or layer is None or layer >= self.num_layers else layer

    def _traced_prefill(self, args: tuple, kwargs: dict) -> bool:
        """Under ``torch.compile`` of the whole model: start a batch-1 prefill whose withdrawal is planned from
        shapes alone (the visual tokens counted from the pixel inputs, checked on the device against ``input_ids``),
        so the compacted layers trace with a length the compiler knows and no graph break. False when the call
        needs the eager hooks (they break the graph and stay exact): another method, a batch of several rows, a cache
        to fill (its record for decode is kept in Python), or a family that does not count its tokens from shapes."""
        layer = self._planned_withdrawal
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        padding = kwargs.get("attention_mask")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.text_config, "use_cache", True)
        if (
            layer is None
            or self.family.media_count is None
            or self.family.media_blocks is not None
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.shape[0] != 1
            or use_cache
            or find_cache(kwargs) is not None
            or (padding is not None and (not isinstance(padding, torch.Tensor) or padding.ndim != 2))
        ):
            return False
        count = self.family.media_count(self.model.config, kwargs)
        if not count or count >= input_ids.shape[1]:
            return False
        # No tensor work here: the plan is made at the first hooked layer, inside the language model's graph (a
        # hook's own ops would make a graph of their own wherever the model's forward already breaks).
        self._call = CallState(
            mode="prefill",
            padding=padding,
            stage_of_layer=[-1] * self.num_layers,
            grid_inputs={"input_ids": input_ids},
            use_cache=False,
            traced=True,
            traced_media_count=count,
        )
        return True

    def _plan_traced_prefill(self, call: CallState) -> None:
        """The plan of a traced prefill (see :meth:`_traced_prefill`), checked on the device: the visual tokens in
        ``input_ids`` must be as many as the pixel inputs give, and the last prompt token must be text."""
        input_ids, count = call.grid_inputs["input_ids"], call.traced_media_count
        length = input_ids.shape[1]
        media = self._media_mask(input_ids)
        layout = Layout.full(call.padding, 1, length, input_ids.device)
        torch._assert_async(
            media.sum() == count,
            "vtexit: the prompt's visual tokens do not match its pixel inputs (a compiled prefill plans with them)",
        )
        last = layout.valid.long().cumsum(1).argmax(dim=1, keepdim=True)  # Layout.last_slot takes a lock (3.11)
        torch._assert_async(~media.gather(1, last).any(), _ends_in_media_error().args[0])
        # Text slots first, in order (a stable sort of the media flags), then the visual slots, cut off.
        source = torch.sort(media, dim=1, stable=True).indices[:, : length - count]
        kept = Layout(layout.index.gather(1, source), layout.valid.gather(1, source), padded=layout.padded)
        call.media, call.layout, call.full_valid = media, layout, layout.valid
        call.planned = {self._planned_withdrawal: (kept, source)}

    @_eager
    def _core_pre_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self._call = None
        self._local.last_call_layout = None
        cache = find_cache(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        padding = kwargs.get("attention_mask")
        prepared = isinstance(padding, dict) or (isinstance(padding, torch.Tensor) and padding.ndim != 2)
        static = is_static(cache)
        if static:
            plan = self._static_decode_plan(kwargs)
            if plan is not None:  # its prefill checked the cache
                self._enter_static_decode(plan, input_ids, kwargs)
                return _static_decode_positions(plan, args, kwargs)
            check_static_cache(cache)
            other = plan_of(cache)
            if other is not None and other.owner is not self and other.record is not None and other.record.compacted:
                raise ValueError(
                    "this static cache was filled while another vtexit patch withdrew tokens; only that patch can "
                    "continue it (reset() it to start again)"
                )
            if not has_media_inputs(kwargs) and int(cache.get_seq_length()) > 0:
                # A static cache filled without this patch: continued untouched (the plan spares later syncs).
                self._untouched_prefill(cache)
                return
            if prepared:
                padding = padding_from_prepared(padding, _sequence_length(input_ids, kwargs.get("inputs_embeds")))
        elif prepared:
            raise ValueError(
                "vtexit needs a 2D attention_mask (got a prepared 4D mask or mask mapping); prepared masks are read "
                "only with a static cache (generate(..., cache_implementation='static'))"
            )
        elif isinstance(cache, Cache) and (past_length := cache.get_seq_length()) > 0:
            self._enter_continuation(cache, kwargs, input_ids, padding, past_length)
            call = self._call
            if call is None:
                return None
            return _reduced_prompt_positions(call.record, args, kwargs, lambda: call.past_length)
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError(
                    "vtexit finds visual tokens from input_ids, but this call passed only inputs_embeds; "
                    "pass input_ids (with pixel inputs) instead"
                )
            self._untouched_prefill(cache if static else None)
            return
        media = self._media_mask(input_ids)
        batch, length = input_ids.shape
        layout = Layout.full(padding, batch, length, input_ids.device, self._positions(batch, length, input_ids.device))
        # The one host read of a prefill, with as few kernels as can be (host time counts at batch 1): is there media;
        # on a static cache, is it filled. Whether a row ends in media is read with the first compaction event (one
        # read either way), or here when in-layer forwards change visual rows from the first layer on. The policy's
        # own questions about the prompt ride along (Policy.prefill_checks).
        checks = {"media": media.any()}
        if self._replaced:
            checks["ends in media"] = _ends_in_media(media, layout)
        filled = cache.get_seq_length() if static else 0  # an int 0 before a static cache's first use
        if isinstance(filled, torch.Tensor):
            checks["filled"] = filled > 0
        asked = self.policy.prefill_checks(media, layout)
        if len(asked) > PREFILL_CHECKS or set(asked) & set(checks):
            raise ValueError(
                f"{type(self.policy).__name__}.prefill_checks returned {sorted(asked)}: at most {PREFILL_CHECKS} "
                f"checks, none named {sorted(checks)}"
            )
        checks.update(asked)
        read = dict(zip(checks, read_checks(list(checks.values())), strict=True))
        if read.get("filled"):
            raise ValueError(
                "media inputs arrived with a non-empty static cache: a new prompt on a filled cache (reset() it "
                "first), or chunked prefill with media after the first chunk (not supported by vtexit)"
            )
        if not read["media"]:
            self._untouched_prefill(cache if static else None)
            return
        if read.get("ends in media"):
            raise _ends_in_media_error()
        block_ids = None
        if self.family.media_blocks is not None and kwargs.get(self.family.media_blocks) is not None:
            block_ids = media_block_ids(kwargs[self.family.media_blocks]).to(input_ids.device)
        self._call = CallState(
            mode="prefill",
            padding=padding,
            media=media,
            block_ids=block_ids,
            layout=layout,
            full_valid=layout.valid,
            stage_of_layer=[-1] * self.num_layers,
            grid_inputs={"input_ids": input_ids, **{name: kwargs.get(name) for name in self.family.grid_inputs}},
            use_cache=kwargs.get("use_cache"),
            checks={name: read[name] for name in asked},
        )
        if self._planned_withdrawal is not None:
            # Planned now (the event's one host read, with the last-token check), so that decoder layers compiled
            # with fullgraph=True run it without a graph break.
            kept, source, ends_in_media = layout.select(layout.valid & ~media, _ends_in_media(media, layout))
            if ends_in_media:
                raise _ends_in_media_error()
            self._call.planned = {self._planned_withdrawal: (kept, source)}

    def _enter_continuation(self, cache: Cache, kwargs: dict, input_ids, padding, past_length: int) -> None:
        """A call on a non-empty cache: decode (or continued text) after our prefill, or an untouched call."""
        if has_media_inputs(kwargs):
            raise ValueError(
                "media inputs arrived with a non-empty cache: a later turn with new images, or chunked prefill "
                "(generate(prefill_chunk_size=...)) with an image after the first chunk. vtexit supports media "
                "only in one prefill on an empty cache; chunked prefill and multi-turn images are not supported."
            )
        with self._lock:
            record = self._records.get(cache)
        if record is None:
            self._local.last_layout = None  # a cache vtexit did not compact: every layer holds every position
            return
        query_length = _sequence_length(input_ids, kwargs.get("inputs_embeds"))
        past_length += record.dropped_before_layer0  # a pre-LLM reduction: layer 0 holds fewer than the prompt
        self._call = CallState(
            mode="decode",
            padding=padding,
            past_length=past_length,
            query_length=query_length,
            record=record,
        )

    def _enter_static_decode(self, plan: StaticPlan, input_ids, kwargs: dict) -> None:
        """A call continuing a static cache this patch filled (no host read: the plan says what each layer holds)."""
        if plan.record is None:
            self._local.last_layout = None
            return
        self._call = CallState(
            mode="decode",
            padding=None,
            query_length=_sequence_length(input_ids, kwargs.get("inputs_embeds")),
            record=plan.record,
            static=plan,
        )

    def _untouched_prefill(self, static_cache: Cache | None) -> None:
        """A call the patch leaves alone; on a static cache, the calls that continue it are marked untouched too."""
        self._local.last_layout = None
        if static_cache is not None:
            attach_plan(static_cache, build_plan(self, None, full_max_length(static_cache), self.num_layers))

    @_eager
    def _core_post_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or output is None:  # None: the forward raised (always_call hooks still run); record nothing
            return
        if call.mode == "decode":
            decode = DecodeCostInputs(
                call.record,
                call.padding,
                call.past_length,
                call.query_length,
                call.fractions,
                static_keys=None if call.static is None else call.static.layer_lengths,
            )
            call.record.cost.decode.append(CallCost("decode", source=decode))
            return
        run_cost = self._finish_prefill(call)
        if call.cache is not None:
            record = PrefillRecord(
                prompt_length=call.media.shape[1],
                media=call.media,
                full_valid=call.full_valid,
                stage_of_layer=call.stage_of_layer,
                stages=call.stages,
                cost=run_cost,
            )
            with self._lock:
                self._records[call.cache] = record
            if is_static(call.cache):
                attach_plan(call.cache, build_plan(self, record, full_max_length(call.cache), self.num_layers))

    def _finish_prefill(self, call: CallState) -> RunCost:
        """What a prefill leaves to the caller: its layout (logits line up with it), policy state and cost record."""
        self._local.last_layout = call.layout
        self._local.last_call_layout = call.layout
        self._local.last_policy_state = call.policy_state
        prefill = PrefillCostInputs(call.full_valid, call.media, call.stages, call.stage_of_layer, call.fractions)
        run_cost = RunCost(prefill=CallCost("prefill", source=prefill))
        self._local.last_cost = run_cost
        return run_cost

    @_eager
    def _layer_pre_hook_eager(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
        call = self._call
        if call is None:
            if layer_idx == self._first_hooked_layer():
                self._check_untouched_cache(kwargs)
            return None
        if call.mode == "prefill":
            return self._prefill_layer(layer_idx, call, args, kwargs)
        return self._decode_layer(layer_idx, call, args, kwargs)

    def _check_untouched_cache(self, kwargs: dict) -> None:
        """A call the core hook left alone must not reach the layers with a cache this patch compacted: that would
        mean the core hook missed the cache (e.g. a renamed keyword) and the step would run unpatched."""
        cache = find_cache(kwargs)
        if cache is None:
            return
        with self._lock:
            record = self._records.get(cache) if isinstance(cache, Cache) else None
        if record is not None and record.compacted:
            raise RuntimeError(
                "vtexit's core hook did not see the cache that this decoder layer got, and that cache was compacted "
                "by this patch: the step would run unpatched. This transformers release passes the cache in a way "
                "vtexit does not know; see vtexit.core.transformers_compat."
            )

    def _attention_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling() and self._traced_decode_plan(kwargs) is not None:
            return None  # scores are read in prefills only
        return self._attention_hook_eager(layer_idx, module, args, kwargs)

    @_eager
    def _attention_hook_eager(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._call
        if call is None or call.mode != "prefill":
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        # Scores and keys are kept per original position, so a policy can read them after later layout changes.
        if layer_idx in self.policy.key_layers:
            keys = rotated_keys(module, hidden, kwargs["position_embeddings"])
            keys = keys.transpose(1, 2).flatten(2)  # (batch, slots, kv heads x head_dim)
            store = keys.new_zeros(*call.full_valid.shape, keys.shape[-1])
            index = call.layout.index.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            call.key_states[layer_idx] = store.scatter(1, index, keys * call.layout.valid[..., None].to(keys.dtype))
        if layer_idx not in self.policy.attention_layers:
            return
        last = call.layout.last_slot.to(torch.long).argmax(dim=1, keepdim=True)
        probs = query_attention(
            module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), last
        ).squeeze(1)
        scores = torch.zeros_like(call.full_valid, dtype=probs.dtype)
        call.scores[layer_idx] = scores.scatter(1, call.layout.index, probs * call.layout.valid)

    # ----------------------------------------------------------------------------------------- prefill
    def _prefill_layer(self, layer_idx: int, call: CallState, args: tuple, kwargs: dict):
        hidden, rest, in_kwargs = _split_hidden(args, kwargs)
        if layer_idx == self._first_hooked_layer():
            cache = find_cache(kwargs)
            # Some families pass use_cache to their layers, others only to the core (Qwen3-VL, Gemma3).
            wants_cache = kwargs.get("use_cache", call.use_cache)
            if cache is None and wants_cache and not self.parts.layers[layer_idx].training:
                raise _lost_cache_error(layer_idx)
            call.cache = cache if isinstance(cache, Cache) else None
            call.static_prefill = is_static(call.cache)  # once: a cache's is_compileable reads every layer
            self._follow_model(hidden)
        event = None
        if call.planned is not None:
            event = call.planned.get(layer_idx)
        elif self._event_layers is None or layer_idx in self._event_layers:
            view = PrefillView(
                layer_idx,
                call.layout,
                call.media,
                hidden,
                scores=call.scores,
                state=call.policy_state,
                key_states=call.key_states,
            )
            keep = self.policy.keep(view)
            if keep is not None:
                first = call.stage < 0 and not self._replaced  # whether a row ends in media is read now (see prefill)
                check = _ends_in_media(call.media, call.layout) if first else None
                merged = self.policy.merge(view, keep)
                hidden = hidden if merged is None else merged
                layout, source, ends_in_media = call.layout.select(keep, check)
                if ends_in_media:
                    raise _ends_in_media_error()
                event = (layout, source)
        if event is not None:
            call.layout, source = event
            hidden = _compact_hidden(hidden, source, call.layout)
            if self.policy.renumbers_at(layer_idx):
                call.renumbered = call.layout
            call.stages.append(Stage(call.layout, self._position_shift(call)))  # its counts: when a cost is read
            call.stage += 1
        call.stage_of_layer[layer_idx] = call.stage
        if call.stage < 0:
            return None if event is None else _join_hidden(hidden, rest, kwargs, in_kwargs)
        if call.static_prefill:  # before the layer's first write: its buffers hold what it keeps
            size_compacted_layer(call.cache, layer_idx, call.layout.index.shape[1], call.media.shape[1])
        kwargs = self._compacted_kwargs(layer_idx, call, hidden, kwargs)
        return _join_hidden(hidden, rest, kwargs, in_kwargs)

    def _position_shift(self, call: CallState) -> torch.Tensor | None:
        """(batch, 1) positions the renumbering events so far removed (what decode tokens move down by)."""
        if call.renumbered is None:
            return None
        return (call.full_valid.sum(1) - call.renumbered.valid.sum(1)).unsqueeze(1)

    def _compacted_kwargs(self, layer_idx: int, call: CallState, hidden: torch.Tensor, kwargs: dict) -> dict:
        """Rewrite the full-sequence kwargs of a decoder layer for the current layout."""
        kwargs = dict(kwargs)
        index = call.layout.index
        if call.renumbered is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = self._renumbered(call, hidden, kwargs)
        else:
            if kwargs.get("position_embeddings") is not None:
                kwargs["position_embeddings"] = self._memo(
                    call, kwargs["position_embeddings"], lambda pe: tuple(gather_sequence(t, index, -2) for t in pe)
                )
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self._memo(
                    call, kwargs["position_ids"], lambda p: gather_sequence(p, index, -1)
                )
        block_ids = None
        if call.block_ids is not None:  # once per stage, like the mask it feeds
            key = ("block ids", call.stage)
            if key not in call.memo:
                call.memo[key] = torch.where(call.layout.valid, call.block_ids.gather(1, index), -1)
            block_ids = call.memo[key]
        key_padding = call.layout.valid if call.layout.padded else None
        kwargs["attention_mask"] = self._mask(layer_idx, call, hidden, key_padding, call.cache, block_ids)
        return kwargs

    def _renumbered(self, call: CallState, hidden: torch.Tensor, kwargs: dict):
        """Positions after dropping: each kept token moves down by the number of real tokens dropped before it at
        renumbering events (a later event that keeps positions, e.g. VTW after a pre-LLM step, moves nothing)."""
        key = ("renumbered", call.stage)
        if key not in call.memo:
            layout, renumbered = call.layout, call.renumbered
            original = gather_sequence(kwargs["position_ids"], layout.index, -1).expand(layout.index.shape)
            valid_before = call.full_valid.cumsum(1) - call.full_valid.long()
            # Per original position: how many of the renumbered layout's tokens come before it.
            kept = torch.zeros_like(call.full_valid).scatter(1, renumbered.index, renumbered.valid)
            kept_before = kept.cumsum(1) - kept.long()
            positions = original - (valid_before - kept_before).gather(1, layout.index)
            call.memo[key] = (positions, self.parts.language_model.rotary_emb(hidden, positions))
        return call.memo[key]

    def replay(
        self,
        layer_inputs: list[tuple[torch.Tensor, dict]],
        start: int,
        keep: torch.Tensor,
        padding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Layout]:
        """Run layers ``start..N-1`` on the kept positions only, from recorded full-sequence layer inputs.

        ``layer_inputs[i]`` is what layer i received (hidden states, kwargs) in an unpatched ``use_cache=False``
        forward. This is how calibration gets the KL for every K from one full forward.
        """
        hidden, _ = layer_inputs[start]
        batch, length = hidden.shape[:2]
        call = CallState(mode="prefill", padding=padding)
        full = Layout.full(padding, batch, length, hidden.device)
        call.layout, source, _ = full.select(keep)
        call.full_valid = full.valid
        call.stage = 0
        hidden = _compact_hidden(hidden, source, call.layout)
        for j in range(start, self.num_layers):
            layer = self.parts.layers[j]
            kwargs = with_cache(self._compacted_kwargs(j, call, hidden, layer_inputs[j][1]), layer, None)
            kwargs["use_cache"] = False
            hidden = layer(hidden, **kwargs)
        return hidden, call.layout

    # ----------------------------------------------------------------------------------------- decode
    def _decode_layer(self, layer_idx: int, call: CallState, args: tuple, kwargs: dict):
        if call.static is not None:
            return self._static_decode_layer(call.static, layer_idx, args, kwargs, memo=call.memo)
        record = call.record
        stage = record.stage_of_layer[layer_idx]
        call.stage = stage
        if stage < 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        key_padding = decode_key_padding(call, stage)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self._mask(layer_idx, call, hidden, key_padding, find_cache(kwargs))
        self._renumber_decode(call.memo, stage, record.stages[stage].position_shift, hidden, kwargs)
        return args, kwargs

    def _static_decode_layer(self, plan: StaticPlan, layer_idx: int, args: tuple, kwargs: dict, memo: dict | None):
        """A decode layer on a static cache: its mask (and renumbered positions) from the plan's fixed tensors.
        Traceable: under compilation ``memo`` is None and each layer derives its mask (a few fused element ops)."""
        stage = plan.stage_of_layer[layer_idx]
        if stage < 0:
            return None
        memo = {} if memo is None else memo
        kwargs = dict(kwargs)
        key = ("static mask", stage)
        hidden = args[0] if args else kwargs["hidden_states"]
        if key not in memo:
            memo[key] = plan.layer_mask(layer_idx, kwargs.get("attention_mask"), find_cache(kwargs), hidden.shape[1])
        kwargs["attention_mask"] = memo[key]
        self._renumber_decode(memo, stage, plan.stages[stage].position_shift, hidden, kwargs)
        return args, kwargs

    def _renumber_decode(self, memo: dict, stage: int, shift: torch.Tensor | None, hidden, kwargs: dict) -> None:
        """Decode positions of a stage's layers after renumbering (in ``kwargs``, memoised once per stage)."""
        if shift is None:
            return
        key = ("decode positions", stage)
        if key not in memo:
            positions = kwargs["position_ids"] - shift
            memo[key] = (positions, self.parts.language_model.rotary_emb(hidden, positions))
        kwargs["position_ids"], kwargs["position_embeddings"] = memo[key]

    # ----------------------------------------------------------------------------------------- for methods
    def current_media(self) -> torch.Tensor | None:
        """Media flags (batch, length) of the slots the running layer holds in this thread's prefill; None during
        decode (every new token is text) or outside a patched call. For replacement forwards (made once per layout:
        every layer between two events gets the same tensor, so do not modify it in place)."""
        call = self._call
        if call is None or call.mode != "prefill":
            return None
        layout, media = call.memo.get("current media", (None, None))
        if layout is not call.layout:
            layout, media = call.layout, call.media.gather(1, call.layout.index) & call.layout.valid
            call.memo["current media"] = (layout, media)
        return media

    def prefill_check(self, name: str) -> bool | None:
        """The value of the policy's prefill check ``name`` (:meth:`Policy.prefill_checks`) in this thread's prefill,
        read with the prefill's one host read; None when the policy did not ask it in this call."""
        call = self._call
        if call is None or call.mode != "prefill":
            raise ValueError(f"prefill check {name!r} asked outside a prefill of this patch")
        return call.checks.get(name)

    def current_layout(self) -> Layout | None:
        """The slots the running layer holds in this thread's prefill (None outside a prefill)."""
        call = self._call
        return call.layout if call is not None and call.mode == "prefill" else None

    def call_mode(self) -> str | None:
        """"prefill" (media on an empty cache), "decode" (continuing a cache this engine filled) or None (a call the
        patch does not touch) for the call running in this thread."""
        call = self._call
        return None if call is None else call.mode

    def call_memo(self, key: Any, build) -> Any:
        """``build()`` once per call of this thread (e.g. index tensors every layer of an in-layer method reuses)."""
        memo = self._call.memo
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def key_media(self, layer_idx: int, num_keys: int) -> torch.Tensor:
        """(batch, num_keys) bool: which keys of layer ``layer_idx`` are media tokens, in the order of the layer's
        cache (the prompt slots the layer holds, then every token since). For in-layer methods in prefill and decode."""
        call = self._call
        if call.mode == "prefill":
            media = self.current_media()
        else:
            stage = call.record.stage_of_layer[layer_idx]
            media = call.record.media
            if stage >= 0:
                layout = call.record.stages[stage].layout
                media = media.gather(1, layout.index) & layout.valid
        if media.shape[1] < num_keys:
            media = torch.nn.functional.pad(media, (0, num_keys - media.shape[1]), value=False)
        return media[:, :num_keys]

    def media_grid(self):
        """Where each prompt position of this thread's prefill sits on its image's patch grid (see
        :class:`vtexit.core.grids.VisualGrid`), from the family's description; memoised per call."""
        call = self._call
        if self.family.visual_grid is None:
            raise ValueError(f"family {self.family.name!r} does not describe its visual patch grid")
        return self.call_memo(
            "media grid",
            lambda: self.family.visual_grid(self.model.config, call.media, call.grid_inputs),
        )

    def record_fraction(
        self,
        layer_idx: int,
        *,
        heads: float | None = None,
        ffn: float | None = None,
        visual_keys: torch.Tensor | None = None,
    ) -> None:
        """Record what the visual query rows of a layer used, for cost records (called by in-layer methods): the
        share of heads and of FFN neurons, and ``visual_keys`` (batch,), the keys all visual query rows of a row
        attended to in total when a method limited them (else every key)."""
        call = self._call
        if call is None:
            return
        old = call.fractions.get(layer_idx, (None, None, None))
        new = (heads, ffn, visual_keys)
        call.fractions[layer_idx] = tuple(o if n is None else n for o, n in zip(old, new, strict=True))

    # ----------------------------------------------------------------------------------------- helpers
    def _media_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if len(self._media_token_ids) == 1:
            return input_ids == self._media_token_ids[0]
        return torch.isin(input_ids, self._media_ids_on(input_ids.device))

    def _media_ids_on(self, device: torch.device) -> torch.Tensor:
        ids = self._media_ids.get(device)
        if ids is None:
            ids = torch.tensor(self.family.media_token_ids(self.model.config), device=device)
            self._media_ids[device] = ids
        return ids

    def _positions(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(batch, length) original positions of a prefill, kept for the next prefill of the same shape (read only,
        like every layout index)."""
        key = (batch, length, device)
        cached = self._full_index
        if cached is None or cached[0] != key:
            cached = (key, torch.arange(length, device=device).expand(batch, length))
            self._full_index = cached
        return cached[1]

    def _follow_model(self, hidden: torch.Tensor) -> None:
        """Method-owned modules follow the model's device and dtype (moved only when they differ)."""
        for module in self.policy.modules().values():
            parameter = next(module.parameters(), None)
            if parameter is not None and (parameter.device != hidden.device or parameter.dtype != hidden.dtype):
                module.to(device=hidden.device, dtype=hidden.dtype)

    def _mask(
        self,
        layer_idx: int,
        call: CallState,
        hidden: torch.Tensor,
        key_padding: torch.Tensor,
        cache,
        block_ids: torch.Tensor | None = None,
    ) -> Any:
        """The rebuilt mask of this stage and layer type, built once per forward."""
        layer_type = self.layer_types[layer_idx]
        key = ("mask", call.stage, layer_type)
        if key not in call.memo:
            call.memo[key] = rebuild_mask(
                self.text_config, layer_type, hidden, key_padding, cache, layer_idx, block_ids
            )
        return call.memo[key]

    @staticmethod
    def _memo(call: CallState, obj: Any, convert) -> Any:
        # Conversions are memoised by identity, once per stage: the text model passes the same objects to every
        # layer (or one per layer type), so each is gathered once per forward. While tracing, each layer converts
        # (Dynamo in torch 2.11 cannot trace id() of a tuple; the compiled graph dedupes the gathers anyway).
        if torch.compiler.is_compiling():
            return convert(obj)
        key = (id(obj), call.stage)
        hit = call.memo.get(key)
        if hit is None or hit[0] is not obj:
            hit = (obj, convert(obj))
            call.memo[key] = hit
        return hit[1]


def _compact_hidden(hidden: torch.Tensor, source: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Gather the kept slots of ``hidden``; pad slots (only when rows kept different numbers) are zeroed so they
    stay finite through the layers."""
    kept = gather_sequence(hidden, source, seq_dim=1)
    return kept * layout.valid.unsqueeze(-1).to(hidden.dtype) if layout.padded else kept


def _ends_in_media(media: torch.Tensor, layout: Layout) -> torch.Tensor:
    """0-dim bool: whether some row's last real prompt token (the one that predicts the next) is a media token."""
    return (media & layout.last_slot).any()


def _lost_cache_error(layer_idx: int) -> RuntimeError:
    return RuntimeError(
        f"vtexit found no cache among decoder layer {layer_idx}'s arguments although the call asked for one "
        "(use_cache=True): this transformers release passes the KV cache in a way vtexit does not know (see "
        "vtexit.core.transformers_compat), and the cache would be lost to the patch"
    )


def _ends_in_media_error() -> ValueError:
    return ValueError(
        "a prompt row ends in a visual token: the last prompt token predicts the next one and would be withdrawn. "
        "Put text after the image (e.g. the chat template's generation prompt). With chunked prefill "
        "(generate(prefill_chunk_size=...)) a chunk can end inside an image: vtexit does not support chunked prefill."
    )


def _reduced_prompt_positions(
    record: PrefillRecord | None, args: tuple, kwargs: dict, past_length: Callable[[], int | torch.Tensor]
) -> tuple | None:
    """The core's arguments for a call continuing a prompt reduced before the language model, when the caller
    passed no ``position_ids``: transformers would number the new tokens from layer 0's cache, which holds only the
    reduced prompt, while the engine renumbers positions of the full prompt (as generate passes them). The new tokens
    get the full prompt's next positions (``past_length()``: an int, or a 0-dim tensor on a static cache), as
    transformers numbers an unpatched model's. None: nothing to change."""
    if record is None or not record.reduces_prompt or kwargs.get("position_ids") is not None:
        return None
    tensor = kwargs.get("input_ids", args[0] if args else None)
    tensor = tensor if tensor is not None else kwargs["inputs_embeds"]
    kwargs = dict(kwargs)
    kwargs["position_ids"] = (torch.arange(tensor.shape[1], device=tensor.device) + past_length()).unsqueeze(0)
    return args, kwargs


def _static_decode_positions(plan: StaticPlan, args: tuple, kwargs: dict) -> tuple | None:
    """:func:`_reduced_prompt_positions` on a static cache: the full prompt's past length from the slots layer 0 has
    written (a 0-dim tensor; no host read)."""
    past = lambda: static_layer_length(find_cache(kwargs).layers[0]) + plan.record.dropped_before_layer0  # noqa: E731
    return _reduced_prompt_positions(plan.record, args, kwargs, past)


def _sequence_length(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    tensor = input_ids if input_ids is not None else inputs_embeds
    return int(tensor.shape[1])


def _split_hidden(args: tuple, kwargs: dict):
    if args:
        return args[0], args[1:], False
    return kwargs["hidden_states"], (), True


def _join_hidden(hidden, rest, kwargs, in_kwargs):
    if in_kwargs:
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return rest, kwargs
    return (hidden, *rest), kwargs

