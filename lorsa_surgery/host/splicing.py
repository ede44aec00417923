"""Splicing Lorsa modules into a Hugging Face model in place of attention layers, and taking them out.

`splice(model, {layer: lorsa}, mode)` swaps each chosen attention module for a `LorsaAttention` that holds
the original (as PEFT's adapters hold their base layer), so `unsplice()` puts back the very same objects.

replace mode: the layer's output is the Lorsa reconstruction.
exact mode:   the layer's output is the original output + (intervened Lorsa output - clean Lorsa output);
              with no hook active it is the original output, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Literal

import torch
from torch import nn

from lorsa_surgery.host.arch import Arch, arch_for
from lorsa_surgery.host.hooks import EXACT_HOOK_NAMES, HOOK_NAMES, HeadContext, HeadHook, HookPoint
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host import state as host_state
from lorsa_surgery.host.placement import execution_device
from lorsa_surgery.lorsa.model import Lorsa

Mode = Literal["replace", "exact"]
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Names under which transformers releases have passed the KV cache to attention modules (5.24 renamed
`past_key_values` to `cache`; GPT-NeoX keeps `layer_past`)."""


def cache_keyword(attention: nn.Module) -> str | None:
    """The keyword under which this attention module takes its KV cache, read from its forward's signature.

    Read from the signature rather than inferred from the transformers version: releases rename it, and a
    module that takes the cache under a name we do not look for would run with none.
    """
    parameters = inspect.signature(attention.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


class _HostSlot:
    """Lorsa keys and values kept in the host layer's own cache slot (replace mode)."""

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def seq_length(self) -> int:
        return self.cache.get_seq_length(self.layer_idx)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.layer_idx)


class _LayerStore:
    """A cache layer object used directly as a Lorsa KV store."""

    def __init__(self, layer):
        self.layer = layer

    def seq_length(self) -> int:
        return self.layer.get_seq_length()

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.update(k, v)


_RESHAPING = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset", "offload", "prefetch")
_EXACT_CLASSES: dict[type, type] = {}


def _make_exact(slot) -> None:
    """Turn a cache layer slot into an exact-mode slot: the original's keys/values, plus Lorsa's in `.lorsa`.

    The slot keeps its class (transformers checks it with isinstance) through a generated subclass whose
    cache-reshaping operations (beam reordering, cropping, batch expansion) reach both.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    base = type(slot)
    if base not in _EXACT_CLASSES:

        def both(name):
            def method(self, *args, **kwargs):
                result = getattr(base, name)(self, *args, **kwargs)
                if self.lorsa.is_initialized:
                    getattr(self.lorsa, name)(*args, **kwargs)
                return result

            return method

        _EXACT_CLASSES[base] = type(f"Exact{base.__name__}", (base,), {name: both(name) for name in _RESHAPING})
    slot.__class__ = _EXACT_CLASSES[base]
    sliding = isinstance(slot, DynamicSlidingWindowLayer)
    slot.lorsa = DynamicSlidingWindowLayer(sliding_window=slot.sliding_window) if sliding else DynamicLayer()


def _require_dynamic(cache, layer_idx: int) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise LorsaSurgeryError(f"Unsupported KV cache {type(cache).__name__}: lorsa-surgery needs a transformers Cache.")
    if layer_idx < len(layers):
        slot = layers[layer_idx]
        if not isinstance(slot, DynamicLayer):
            raise LorsaSurgeryError(
                f"Layer {layer_idx} has a {type(slot).__name__} cache slot, which cannot hold Lorsa keys; "
                "use the default dynamic cache (cache_implementation='dynamic')."
            )


class _Taps:
    """The hook points inside the Lorsa forward pass of one call (`lorsa_surgery.lorsa.model.Taps`)."""

    def __init__(self, site: "LorsaAttention", ctx: HeadContext):
        self.site, self.ctx = site, ctx
        self.wants_pattern = site.hook_pattern.live

    def qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        site, ctx = self.site, self.ctx
        if site.hook_q.live:
            q = site.hook_q(q.transpose(1, 2), ctx).transpose(1, 2)
        if site.hook_k.live:
            k = site.hook_k(k.transpose(1, 2), ctx).transpose(1, 2)
        if site.hook_v.live:  # one value per OV head, as the heads are numbered: head i is group i // g, column i % g
            B, n_qk, T, g = v.shape
            v = site.hook_v(v.transpose(1, 2).reshape(B, T, n_qk * g), ctx).reshape(B, T, n_qk, g).transpose(1, 2)
        return q, k, v

    def pattern(self, pattern: torch.Tensor) -> torch.Tensor:
        return self.site.hook_pattern(pattern, self.ctx)


def _tap(point: HookPoint, x: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
    return point(x, ctx) if point.live else x


class LorsaAttention(nn.Module):
    """A spliced attention layer: runs a Lorsa module in place of (replace) or beside (exact) the original.

    Its hook points (`hook_in`, `hook_acts`, ...: `lorsa_surgery.host.hooks`) are identity submodules; with none of
    them live the forward pass is the fast path: no dense activations, no attention pattern.
    """

    def __init__(
        self, original: nn.Module, lorsa: Lorsa, source: Lorsa, layer: int, mode: Mode, post_norm: nn.Module | None
    ):
        super().__init__()
        self.original = original
        self.lorsa = lorsa
        self.source = source
        """The module as the user gave it (in its recorded input space); what gets saved."""
        self.layer = layer
        self.layer_idx = getattr(original, "layer_idx", layer)
        self.mode = mode
        self.post_norm = post_norm
        for name in HOOK_NAMES + (EXACT_HOOK_NAMES if mode == "exact" else ()):
            setattr(self, name, HookPoint())
        self._points = [module for module in self.children() if isinstance(module, HookPoint)]
        self._signature = inspect.signature(original.forward)
        self.cache_keyword = cache_keyword(original)
        """Where the host passes the KV cache (None: the signature names none, so every known alias is looked at)."""

    @property
    def hooks(self) -> list[HeadHook]:
        """The head hooks, called in order on the activations at every forward: those of `hook_acts`."""
        return self.hook_acts.hooks

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:  # some blocks pass the cache or mask positionally; name them as the original would
            bound = self._signature.bind_partial(hidden_states, *args, **kwargs)
            kw = dict(bound.arguments)
            kw.update(kw.pop("kwargs", {}))
        else:
            kw = kwargs
        cache = kw.get(self.cache_keyword) if self.cache_keyword else None
        if cache is None:  # a caller that still uses a deprecated alias, which the original's shim would accept
            cache = next((kw[k] for k in CACHE_KEYWORDS if kw.get(k) is not None), None)
        if cache is None and kw.get("use_cache"):
            where = self.cache_keyword or " / ".join(CACHE_KEYWORDS)
            raise LorsaSurgeryError(f"Layer {self.layer} was asked to use a cache but received none under {where!r}.")
        if cache is not None:
            _require_dynamic(cache, self.layer_idx)

        past = self._past(cache)
        position_ids = kw.get("position_ids")
        B, T, _ = hidden_states.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=hidden_states.device).expand(B, T)
        mask = kw.get("attention_mask")
        live = any(point.live for point in self._points)
        ctx = HeadContext(self.layer, position_ids, past, mask) if live else None
        x = _tap(self.hook_in, hidden_states, ctx) if live else hidden_states

        if self.mode == "exact":
            original_out = self.original(x, *args, **kwargs)[0]
            if self.post_norm is not None:
                original_out = self.post_norm(original_out)
            if live:
                original_out = _tap(self.hook_original, original_out, ctx)
            store = None
            if cache is not None:
                slot = cache.layers[self.layer_idx]
                if not hasattr(slot, "lorsa"):
                    _make_exact(slot)
                store = _LayerStore(slot.lorsa)
        else:
            store = _HostSlot(cache, self.layer_idx) if cache is not None else None

        # Rotary types the module cannot compute come from the host's own cos and sin, so every type the host
        # implements is exact.
        rotary = kw.get("position_embeddings") if self.lorsa.cfg.host_rotary else None
        z = self.lorsa.hidden_pre(x, position_ids, mask, store, _Taps(self, ctx) if live else None, rotary)
        if live:
            z = _tap(self.hook_z, z, ctx)
        if self.mode == "replace":
            if live and self.hook_acts.live:
                out = self.lorsa.decode(self.hook_acts(self.lorsa.activate(z), ctx))
            else:
                out = self.lorsa.reconstruct(z)  # only the K selected heads' rows of W_O
            out = out.to(x.dtype)
            return (_tap(self.hook_out, out, ctx) if live else out), None
        if not live or not (self.hook_acts.live or self.hook_out.live or self.hook_error.live):
            return original_out, None
        return self._exact_output(original_out, z, ctx), None

    def _exact_output(self, original_out: torch.Tensor, z: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        """The original output plus what the hooks changed in the reconstruction: hook_out + hook_error, computed
        as differences from clean copies, so an unedited run is bit for bit the original's and edits in place count."""
        clean = self.lorsa.activate(z)
        acts = _tap(self.hook_acts, clean.clone(), ctx)
        if not (self.hook_out.live or self.hook_error.live):
            delta = (acts - clean).to(self.lorsa.W_O.dtype) @ self.lorsa.W_O
            return original_out + delta.to(original_out.dtype)
        clean_out = self.lorsa.decode(clean).to(original_out.dtype)
        out = _tap(self.hook_out, self.lorsa.decode(acts).to(original_out.dtype), ctx)
        output = original_out + (out - clean_out)
        if self.hook_error.live:
            error = original_out - clean_out
            output = output + (self.hook_error(error.clone(), ctx) - error)
        return output

    def _past(self, cache) -> int:
        """Tokens of this layer's Lorsa keys already in the cache (its own store in exact mode), read before the call."""
        if cache is None:
            return 0
        if self.mode == "replace":
            return cache.get_seq_length(self.layer_idx)
        slot = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        return slot.lorsa.get_seq_length() if slot is not None and hasattr(slot, "lorsa") else 0


class Splice:
    """Lorsa modules spliced into a model. `unsplice()` (or leaving a `with` block) restores it exactly."""

    def __init__(self, model: nn.Module, arch: Arch, mode: Mode):
        self.model, self.arch, self.mode = model, arch, mode
        self.sites: dict[int, LorsaAttention] = {}
        self.base: dict | None = None
        """The base model's record (`lorsa_surgery.host.models.base_record`) when known; `save_patched` writes it."""
        self.attached: dict[str, Any] = {}
        """What other parts of the toolkit keep on this splice until it is taken out, by name (`attach`):
        "interventions", an InterventionSet kept active; "adapter", the PEFT LoraConfig of a LoRA adapter."""
        self._removers: dict[str, Callable[[], None]] = {}

    def attach(self, name: str, value: Any, remove: Callable[[], None]) -> None:
        """Keep `value` under `name` until `detach(name)` or `unsplice()`, which call `remove` to take it off the model."""
        if name in self.attached:
            raise LorsaSurgeryError(f"This splice already carries {name}; take them off first.")
        self.attached[name], self._removers[name] = value, remove

    def detach(self, name: str) -> None:
        """Take off what is attached under `name`, if anything."""
        self.attached.pop(name, None)
        remove = self._removers.pop(name, None)
        if remove is not None:
            remove()

    @property
    def interventions(self):
        """The InterventionSet attached (saved with the patched model), or None."""
        return self.attached.get("interventions")

    @property
    def adapter(self):
        """The PEFT LoraConfig of the LoRA adapter on the model (`lorsa_surgery.training.healing`), or None."""
        return self.attached.get("adapter")

    def __getitem__(self, layer: int) -> LorsaAttention:
        if layer not in self.sites:
            raise LorsaSurgeryError(f"Layer {layer} carries no Lorsa module (spliced layers: {sorted(self.sites)}).")
        return self.sites[layer]

    @property
    def layers(self) -> list[int]:
        return sorted(self.sites)

    def modules(self) -> dict[int, Lorsa]:
        """The spliced modules as given (in their recorded input space)."""
        return {layer: site.source for layer, site in sorted(self.sites.items())}

    def unsplice(self) -> nn.Module:
        """Put back the original attention modules, after taking off what is attached (interventions, an adapter);
        returns the model."""
        for name in reversed(list(self.attached)):
            self.detach(name)
        layers = self.arch.layer_list(self.model)
        for layer, site in self.sites.items():
            site.hooks.clear()
            setattr(layers[layer], self.arch.attention, site.original)
            if site.post_norm is not None:
                setattr(layers[layer], self.arch.post_attention_norm, site.post_norm)
        self.sites.clear()
        if host_state.get(self.model, "splice") is self:
            host_state.put(self.model, "splice", None)
        return self.model

    @contextlib.contextmanager
    def original(self) -> Iterator[nn.Module]:
        """Within it the model runs its own attention again: each spliced layer holds its original module (and the
        post-attention norm it absorbed); the splice is back on leaving."""
        layers = self.arch.layer_list(self.model)
        for layer, site in self.sites.items():
            setattr(layers[layer], self.arch.attention, site.original)
            if site.post_norm is not None:
                setattr(layers[layer], self.arch.post_attention_norm, site.post_norm)
        try:
            yield self.model
        finally:
            for layer, site in self.sites.items():
                setattr(layers[layer], self.arch.attention, site)
                if site.post_norm is not None:
                    setattr(layers[layer], self.arch.post_attention_norm, nn.Identity())

    def __enter__(self) -> "Splice":
        return self

    def __exit__(self, *exc) -> None:
        self.unsplice()

    def __repr__(self) -> str:
        return f"Splice(mode={self.mode}, layers={self.layers})"


def host_view(arch: Arch, block: nn.Module, lorsa: Lorsa) -> tuple[Lorsa, nn.Module | None]:
    """The module as it runs inside a host decoder layer, and the post-attention norm it takes over (or None).

    A module trained in processed coordinates gets the input norm's gain (and LayerNorm bias) folded in; on
    Gemma its output is taken after the post-attention norm, which the splice then absorbs.
    """
    if lorsa.cfg.input_space != "processed":
        return lorsa, None
    if arch.input_norm is None:
        raise LorsaSurgeryError(f"A {arch.name} layer has no norm before attention to fold a processed-space module's input into.")
    mapped = lorsa.in_input_space("hf", *arch.norm_gain(getattr(block, arch.input_norm)))
    post_norm = getattr(block, arch.post_attention_norm) if arch.post_attention_norm is not None else None
    return mapped, post_norm


def splice(model: nn.Module, modules: dict[int, Lorsa], mode: Mode = "replace", dtype: torch.dtype | None = None) -> Splice:
    """Put Lorsa modules in place of the attention of the given layers; returns the handle to undo it.

    All or nothing: every entry is checked (and mapped into the host's coordinates, see `host_view`) before
    the model is touched, so a bad entry raises and leaves the model as it was. Each module moves to the
    execution device of its layer (where Accelerate runs it, for a dispatched model) and computes in `dtype`,
    by default the host layer's.
    """
    if mode not in ("replace", "exact"):
        raise LorsaSurgeryError(f"mode must be replace or exact, got {mode!r}.")
    if not modules:
        raise LorsaSurgeryError("No Lorsa modules to splice: give {layer: module}.")
    arch = arch_for(model)
    layers = arch.layer_list(model)
    existing = spliced(model)
    if existing is not None and existing.sites:
        raise LorsaSurgeryError(f"This model already has Lorsa modules spliced at layers {existing.layers}; unsplice them first.")
    hidden = model.config.get_text_config(decoder=True).hidden_size
    planned: list[tuple[nn.Module, LorsaAttention]] = []
    for layer, lorsa in modules.items():
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layers):
            raise LorsaSurgeryError(f"Layer {layer!r} is out of range: the model has {len(layers)} layers.")
        if not isinstance(lorsa, Lorsa):
            raise LorsaSurgeryError(f"The module for layer {layer} is a {type(lorsa).__name__}, not a Lorsa module.")
        if lorsa.cfg.d_model != hidden:
            raise LorsaSurgeryError(f"The Lorsa module for layer {layer} has d_model={lorsa.cfg.d_model}, the model {hidden}.")
        block = layers[layer]
        original = arch.attention_at(model, layer)  # refuses layers without attention Lorsa can take
        if isinstance(original, LorsaAttention):
            raise LorsaSurgeryError(f"Layer {layer} already carries a Lorsa module; unsplice it first.")
        if lorsa.cfg.host_layer is not None and lorsa.cfg.host_layer != layer:
            warnings.warn(f"A Lorsa module trained for layer {lorsa.cfg.host_layer} is spliced at layer {layer}.", stacklevel=2)
        mapped, post_norm = host_view(arch, block, lorsa)
        mapped = mapped.to(device=execution_device(original), dtype=dtype or next(original.parameters()).dtype)
        planned.append((block, LorsaAttention(original, mapped, lorsa, layer, mode, post_norm)))
    handle = Splice(model, arch, mode)
    handle.base = host_state.get(model, "base")  # set by lorsa_surgery.host.models.load_model
    for block, site in sorted(planned, key=lambda p: p[1].layer):
        setattr(block, arch.attention, site)
        if site.post_norm is not None:
            setattr(block, arch.post_attention_norm, nn.Identity())
        handle.sites[site.layer] = site
    host_state.put(model, "splice", handle)
    return handle


def unsplice(model: nn.Module) -> nn.Module:
    """Take the spliced Lorsa modules out of `model` (as `handle.unsplice()` does) and return it as it was."""
    handle = spliced(model)
    if handle is None:
        raise LorsaSurgeryError("This model has no Lorsa modules spliced.")
    return handle.unsplice()


def spliced(model: nn.Module) -> Splice | None:
    """The splice in place in `model`, or None."""
    return host_state.get(model, "splice")
