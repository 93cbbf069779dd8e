"""The schedule engine: applies a method's compaction events inside an unmodified transformers model.

Methods decide *which* positions each row keeps and *when* (a :class:`~vtexit.core.policy.Policy`); the engine
does the mechanics with forward pre-hooks, so no model forward is copied:

* a hook on the multimodal core decides the kind of each call (:mod:`vtexit.core.calls.kinds`): a prefill (media
  tokens, empty cache), a decode step (a cache this engine filled), or a call it leaves alone;
* a hook on every decoder layer gathers ``hidden_states`` at an event and rewrites the sequence-aligned kwargs
  the text model computed once for all layers (rotary cos/sin, position ids, attention mask): in an eager prefill
  (:mod:`~vtexit.core.calls.eager_prefill`), a prefill traced by ``torch.compile``
  (:mod:`~vtexit.core.calls.traced_prefill`), and decode on a dynamic (:mod:`~vtexit.core.calls.dynamic_decode`)
  or static cache (:mod:`~vtexit.core.calls.static_decode`).

This module is the coordinator: it attaches and removes the hooks and sends each hook to the part that handles
its kind of call. What it knows of the model and keeps between calls is :class:`~vtexit.core.engine_state.EngineState`;
what a method's own code may ask of a running call is :class:`~vtexit.core.call_access.CallAccess`. Nothing is
global, so differently patched models work side by side.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import nn

from vtexit.core.calls import dynamic_decode, eager_prefill, kinds, static_decode, traced_prefill
from vtexit.core.calls.deepstack import deepstack_on_layout, note_deepstack
from vtexit.core.compiled import eager_under_compile as _eager
from vtexit.core.compiled import forget_compiled_graphs
from vtexit.core.engine_state import EngineState
from vtexit.core.guards import copy_removable_handle, poison, refuse_compiled
from vtexit.core.layout import Layout
from vtexit.core.loss import kept_positions_loss
from vtexit.core.static_cache import drop_plan
from vtexit.core.torch_support import check_tested_torch
from vtexit.core.transformers_compat import (
    DEEPSTACK_METHOD,
    check_tested_version,
    forget_compiled_call,
    has_deepstack,
)


class ScheduleEngine(EngineState):
    """Attaches a :class:`Policy` to a model. Use :meth:`attach`/:meth:`detach` (or a method's handle)."""

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
        if "generate" in self.model.__dict__:
            raise ValueError(f"{type(self.model).__name__}.generate is already replaced on this instance")
        # Everything that can refuse is resolved before the first hook, so a refusal leaves the model untouched.
        watched = set(self.policy.attention_layers) | set(self.policy.key_layers)
        attention_modules = [(i, self.attention_module(i)) for i in sorted(watched)]
        hooks = self.hooks
        hooks.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        hooks.append(self.model.register_forward_hook(self._top_post_hook, always_call=True))
        hooks.append(self.parts.core.register_forward_pre_hook(self._core_pre_hook, with_kwargs=True))
        hooks.append(self.parts.core.register_forward_hook(self._core_post_hook, with_kwargs=True, always_call=True))
        first = self.first_hooked_layer
        for i, layer in enumerate(self.parts.layers[first:], start=first):
            hooks.append(layer.register_forward_pre_hook(partial(self._layer_pre_hook, i), with_kwargs=True))
        for i, attention in attention_modules:
            hooks.append(attention.register_forward_pre_hook(partial(self._attention_hook, i), with_kwargs=True))
        for module, forward in replacements.items():
            # A partial (not a bound method) so that copy.deepcopy of the model copies the forward's owner too.
            module.forward = partial(forward, module)
            self.replaced.append(module)
        hooks.extend(self.policy.outer_hooks(self.model))
        if self._reduces_prompt(0) and 0 in (self.event_layers or ()) and has_deepstack(self.parts.language_model):
            language_model = self.parts.language_model
            hooks.append(language_model.register_forward_pre_hook(partial(note_deepstack, self), with_kwargs=True))
            setattr(language_model, DEEPSTACK_METHOD, partial(deepstack_on_layout, self))
        if hasattr(type(self.model), "generate"):  # a partial, as for replaced forwards (deep copies follow)
            self.model.generate = partial(kinds.generate_under_patch, self)
        self.model._vtexit_engine = self
        forget_compiled_call(self.model)  # a deep copy's may still run the model it was copied from
        forget_compiled_graphs()

    def detach(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        for module in self.replaced:
            del module.forward
        self.replaced.clear()
        self.parts.language_model.__dict__.pop(DEEPSTACK_METHOD, None)
        if isinstance(self.model.__dict__.get("generate"), partial):
            del self.model.generate
        with self.lock:
            caches = [cache for cache, record in self.records.items() if record.compacted]
            self.records.clear()
        for cache in caches:
            drop_plan(cache)
            poison(cache)
        self.init_runtime_state()
        if getattr(self.model, "_vtexit_engine", None) is self:
            del self.model._vtexit_engine
        forget_compiled_call(self.model)
        forget_compiled_graphs()

    @property
    def attached(self) -> bool:
        return bool(self.hooks)

    def __deepcopy__(self, memo: dict) -> ScheduleEngine:
        """A copied model keeps a working patch of its own: the engine is copied with the model's modules (the
        hooks in the copied modules point to the copy) and starts with no call state and no cache records."""
        new = ScheduleEngine.__new__(ScheduleEngine)
        memo[id(self)] = new
        skip = {"_local", "lock", "records", "hooks"}
        for key, value in self.__dict__.items():
            if key not in skip:
                setattr(new, key, copy.deepcopy(value, memo))
        new.init_runtime_state()
        new.hooks = [copy_removable_handle(h, memo) for h in self.hooks]
        return new

    def __reduce_ex__(self, protocol):
        raise ValueError(
            "a model patched by vtexit cannot be pickled (torch.save(model)): call handle.remove() first, or save "
            "model.state_dict(), which the patch does not change"
        )

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
        return eager_prefill.replay(self, layer_inputs, start, keep, padding)

    # ----------------------------------------------------------------------------------------- hooks
    # Each hook runs its eager body outside compilation. Under torch.compile, a decode step on a static cache this
    # patch filled takes a traceable path instead (no Python state, no graph break), so that transformers' compiled
    # decode stays one graph; every other call breaks the graph around the eager body.
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            if kwargs.get("labels") is None:
                return None
            self.labels_under_compile = True  # compiled post hooks call their eager body from now on
        return self._top_pre_hook_eager(module, args, kwargs)

    def _top_post_hook(self, module: nn.Module, args: tuple, output: Any):
        if torch.compiler.is_compiling() and not self.labels_under_compile:
            return None
        return self._top_post_hook_eager(module, args, output)

    @_eager
    def _top_pre_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict):
        """Labels are taken from the call and turned into a loss over the kept positions afterwards."""
        self.thread_state.labels = None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        self.thread_state.labels = kwargs.pop("labels")
        return args, kwargs

    @_eager
    def _top_post_hook_eager(self, module: nn.Module, args: tuple, output: Any):
        local = self.thread_state
        labels, local.labels = getattr(local, "labels", None), None
        if labels is None or getattr(output, "logits", None) is None:
            return None
        output.loss = kept_positions_loss(output.logits, labels, getattr(local, "last_call_layout", None))
        return output

    def _core_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if torch.compiler.is_compiling():
            plan = static_decode.traced_decode_plan(self, kwargs)
            if plan is not None:
                return static_decode.static_decode_positions(plan, args, kwargs, self.grid_offset)
            if traced_prefill.start_traced_prefill(self, args, kwargs):
                return None
        return self._core_pre_hook_eager(module, args, kwargs)

    @_eager
    def _core_pre_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        return kinds.begin_call(self, args, kwargs)

    def _core_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.compiler.is_compiling():
            if static_decode.traced_decode_plan(self, kwargs) is not None:
                return None
            call = self.current_call
            if call is not None and call.traced:
                self.current_call = None
                kinds.finish_prefill(self, call)
                return None
        return self._core_post_hook_eager(module, args, kwargs, output)

    @_eager
    def _core_post_hook_eager(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        kinds.end_call(self, output)

    def _layer_pre_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():
            plan = static_decode.traced_decode_plan(self, kwargs)
            if plan is not None:
                return static_decode.static_decode_layer(self, plan, layer_idx, args, kwargs, memo=None)
            call = self.current_call
            if call is not None and call.traced and call.planned is None:
                traced_prefill.plan_traced_prefill(self, call)
            if call is not None and call.planned is not None:  # no host read and no Python-only state: traceable
                return eager_prefill.prefill_layer(self, layer_idx, call, args, kwargs)
            if call is not None and call.mode == "decode" and not self.replaced:  # the core hook ran eagerly
                return self._decode_layer(layer_idx, call, args, kwargs)
        return self._layer_pre_hook_eager(layer_idx, module, args, kwargs)

    @_eager
    def _layer_pre_hook_eager(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
        call = self.current_call
        if call is None:
            if layer_idx == self.first_hooked_layer:
                kinds.check_untouched_cache(self, kwargs)
            return None
        if call.mode == "prefill":
            return eager_prefill.prefill_layer(self, layer_idx, call, args, kwargs)
        return self._decode_layer(layer_idx, call, args, kwargs)

    def _decode_layer(self, layer_idx: int, call, args: tuple, kwargs: dict):
        if call.static is not None:
            return static_decode.static_decode_layer(self, call.static, layer_idx, args, kwargs, memo=call.memo)
        return dynamic_decode.decode_layer(self, layer_idx, call, args, kwargs)

    def _attention_hook(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling() and static_decode.traced_decode_plan(self, kwargs) is not None:
            return None  # scores are read in prefills only
        return self._attention_hook_eager(layer_idx, module, args, kwargs)

    @_eager
    def _attention_hook_eager(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        eager_prefill.record_attention(self, layer_idx, module, args, kwargs)
