"""Hook points: named places inside every spliced layer where a run can be read or changed, and the API over them.

Each spliced layer (`LorsaAttention`, where the attention module was: `model.model.layers[3].self_attn`) carries
these identity submodules, so `register_forward_hook`, nnsight (`.output`) and pyvene reach them as they reach any
module; in this API they are named by layer, `L3.hook_acts`, or for every spliced layer at once, `hook_acts`.

| name            | shape                | what passes through                                                         |
|-----------------|----------------------|-----------------------------------------------------------------------------|
| `hook_in`       | [B, T, d_model]      | the layer's input (in exact mode the original attention reads it too)      |
| `hook_q`        | [B, T, n_qk, d_qk]   | queries, after the optional QK norm and rotary                              |
| `hook_k`        | [B, T, n_qk, d_qk]   | this call's keys, likewise; they enter the KV cache after the hook          |
| `hook_v`        | [B, T, n_ov]         | each OV head's value (a scalar per head and token); cached after the hook   |
| `hook_pattern`  | [B, n_qk, T, S]      | each QK head's attention over all S keys, cached ones included              |
| `hook_z`        | [B, T, n_ov]         | pre-activations (the reference's hidden_pre): values mixed by the pattern  |
| `hook_acts`     | [B, T, n_ov]         | head activations after the sparsity rule, zero where a head did not fire    |
| `hook_out`      | [B, T, d_model]      | the Lorsa reconstruction from `hook_acts`; in replace mode the layer output |
| `hook_original` | [B, T, d_model]      | exact mode only: the original attention's output (after an absorbed norm)  |
| `hook_error`    | [B, T, d_model]      | exact mode only: original minus the clean reconstruction                   |

In exact mode the layer's output is `hook_out + hook_error`: the original output plus whatever an edit changed in
the reconstruction (computed as that sum's difference, so an unedited run stays bit for bit the original's). A hook
may return a replacement or edit its tensor in place; either reaches the output.

A point costs nothing until something listens to it (see `HookPoint.live`): a layer none of whose points listens
runs the splice's fast path, the pattern is materialised only while `hook_pattern` listens (its route through the
explicit pattern agrees with the fused kernel to rounding), and dense activations are built only while `hook_acts`,
`hook_out` or `hook_error` listen (a replace-mode layer then decodes every head, not the K selected heads' rows of
W_O: again the same to rounding). A tool that replaces a point's `forward` (nnsight instruments modules that way)
keeps it listening for as long as it does.

The other way in, `watch_attention`, sits outside: it records what the module in a layer's attention slot receives
and returns, spliced (a `LorsaAttention`: its input is what `hook_in` sees, its output the layer's) or not (the
host's own attention, which has no hook points). Training capture and the positional head scores read the host's
attention through it.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.host.placement import input_device

HOOK_NAMES = ("hook_in", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_acts", "hook_out")
"""The hook points of every spliced layer, in the order a forward pass reaches them."""
EXACT_HOOK_NAMES = ("hook_original", "hook_error")
"""The hook points only an exact-mode layer has."""


@dataclass
class HeadContext:
    """What a head hook knows about the step it is called in."""

    layer: int
    """Index of the spliced layer."""
    position_ids: torch.Tensor
    """Absolute positions [B, T] of the tokens in this call (right under left padding and the KV cache)."""
    past_length: int
    """Tokens already in the cache before this call; 0 for a prefill or an uncached pass."""
    attention_mask: torch.Tensor | None
    """The mask the host passed, in its attention implementation's format."""

    @property
    def is_prefill(self) -> bool:
        return self.past_length == 0


HeadHook = Callable[[torch.Tensor, HeadContext], "torch.Tensor | None"]
"""fn(acts [B, T, n_heads], ctx) -> new acts, or None to leave them as they are."""


class Spliced(Protocol):
    """What the API over hook points needs of a splice (`Splice`): its model and its spliced layers by index."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def sites(self) -> Mapping[int, nn.Module]: ...


S = TypeVar("S", bound=Spliced)

Hook = Callable[..., "torch.Tensor | None"]
"""fn(tensor, ctx) or fn(tensor) -> a replacement tensor, or None to leave it as it is (ctx: a HeadContext)."""


class HookPoint(nn.Module):
    """An identity at a named place in a spliced layer; `forward(x, ctx)` returns x unless `hooks` edit it."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list[HeadHook] = []
        """This toolkit's hooks (`hooks`, `run_with_cache`, interventions), called in order inside forward: torch
        forward hooks and nnsight see their result as the output."""

    def forward(self, x: torch.Tensor, ctx: HeadContext | None = None) -> torch.Tensor:
        for hook in self.hooks:
            new = hook(x, ctx)
            x = x if new is None else new
        return x

    @property
    def live(self) -> bool:
        """Whether anything listens here: our hooks, torch hooks on it or on every module, or a replaced forward.
        The layer calls a point only while it is live, and computes what only it needs only then."""
        return bool(self.hooks or self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                    or self._backward_pre_hooks or "forward" in self.__dict__
                    or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


# ---- by name ------------------------------------------------------------------------------------------------------


def points(handle: Spliced, names: Iterable[str] | None = None) -> dict[str, HookPoint]:
    """The hook points `names` pick, by full name (`L3.hook_acts`), in layer order: a bare name (`hook_acts`) picks
    it in every spliced layer that has it; None picks every point of every spliced layer."""
    every = {f"L{layer}.{name}": getattr(site, name) for layer, site in sorted(handle.sites.items())
             for name in HOOK_NAMES + EXACT_HOOK_NAMES if hasattr(site, name)}
    if names is None:
        return every
    if isinstance(names, str):
        names = [names]
    chosen: set[str] = set()
    for name in names:
        found = {key for key in every if key == name or key.partition(".")[2] == name}
        if not found:
            exact = " (an exact-mode splice has it)" if name.rpartition(".")[2] in EXACT_HOOK_NAMES else ""
            raise LorsaSurgeryError(f"No hook point {name!r}{exact}: each spliced layer ({sorted(handle.sites)}) has "
                                    f"{', '.join(HOOK_NAMES + EXACT_HOOK_NAMES)}, named as L3.hook_acts (or bare, for all).")
        chosen |= found
    return {key: point for key, point in every.items() if key in chosen}


def _with_context(fn: Hook) -> HeadHook:
    """fn as a two-argument hook: one whose signature takes a single positional argument gets the tensor alone, and so
    does a builtin with no signature to read (torch.zeros_like), which cannot know what a context is."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return lambda x, ctx: fn(x)
    kinds = [p.kind for p in parameters]
    P = inspect.Parameter
    takes_context = P.VAR_POSITIONAL in kinds or sum(k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for k in kinds) > 1
    return fn if takes_context else (lambda x, ctx: fn(x))


def add_hooks(handle: Spliced, fns: Mapping[str, Hook]) -> Callable[[], None]:
    """Install each fn at the points its name picks (see `points`), after those already there; returns the
    function that takes them all out again."""
    installed = [(point, _with_context(fn)) for name, fn in fns.items() for point in points(handle, [name]).values()]
    for point, hook in installed:
        point.hooks.append(hook)

    def remove() -> None:
        for point, hook in installed:
            if hook in point.hooks:
                point.hooks.remove(hook)

    return remove


@contextlib.contextmanager
def hooks(handle: S, fns: Mapping[str, Hook]) -> Iterator[S]:
    """Within it, each fn(tensor, ctx) sees what passes its hook points and may return a replacement:

        with ls.hooks(handle, {"L3.hook_acts": lambda acts, ctx: acts * 2}):
            model.generate(...)
    """
    remove = add_hooks(handle, fns)
    try:
        yield handle
    finally:
        remove()


# ---- caching ------------------------------------------------------------------------------------------------------


class Cache:
    """What one run passed through the hook points, by full name (`L3.hook_acts`), and the run's logits."""

    def __init__(self, tensors: dict[str, torch.Tensor], logits: torch.Tensor | None):
        self._tensors = tensors
        self.logits = logits
        """[B, T, V], or None for a run stopped after its deepest layer."""

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"{name!r} is not in this cache (it holds {', '.join(self._tensors) or 'nothing'}).")
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._tensors.items())

    def __repr__(self) -> str:
        return "Cache(" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items()) + ")"


def model_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments of one uncached pass, on the model's input device. With a padding mask, positions count from
    each row's first real token, as generate() counts them, so left-padded rows see the positions they would alone."""
    input_ids = torch.as_tensor(input_ids)
    device = input_device(model)
    kwargs: dict[str, Any] = {"input_ids": (input_ids[None] if input_ids.dim() == 1 else input_ids).to(device), "use_cache": False}
    if attention_mask is not None:
        mask = attention_mask.to(device)
        kwargs["attention_mask"] = mask
        if "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return kwargs


def run_with_cache(
    handle: Spliced, input_ids: torch.Tensor, names: Iterable[str] | None = None, grad: bool = False, *,
    attention_mask: torch.Tensor | None = None, stop: bool = False,
) -> Cache:
    """Run the model once (uncached) and keep what passes the hook points `names` pick (default: all; see `points`).

    With `grad` the run records a graph and the cached tensors stay in it: after a backward pass from the logits each
    holds its gradient in `.grad` (a tensor nothing upstream needs a gradient for enters the rest of the run as a leaf
    that does). Without, they are detached. With `stop` the model stops once the deepest layer named has run, and the
    cache has no logits. Hooks and interventions already active shape the run, in the order they were installed.
    """
    chosen = points(handle, names)
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[torch.Tensor, Any], "torch.Tensor | None"]:
        def hook(x: torch.Tensor, ctx: Any) -> torch.Tensor | None:
            if not grad:
                kept[name] = x.detach()
                return None
            if x.requires_grad:
                x.retain_grad()
                kept[name] = x
                return None
            kept[name] = x.detach().requires_grad_()
            return kept[name]

        return hook

    remove = add_hooks(handle, {name: keep(name) for name in chosen})
    layers = sorted({int(name[1:].partition(".")[0]) for name in chosen})
    logits = None
    try:
        with torch.set_grad_enabled(grad), watch_attention(handle.model, layers[-1:] if stop else [], stop=True):
            logits = handle.model(**model_inputs(handle.model, input_ids, attention_mask)).logits
    finally:
        remove()
    return Cache({name: kept[name] for name in chosen if name in kept}, logits)


# ---- the attention slot, spliced or not ---------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """What the module in one layer's attention slot received and returned in one forward pass."""

    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None

    @property
    def hidden_states(self) -> torch.Tensor:
        """Its input [B, T, d_model]."""
        return self.kwargs["hidden_states"] if "hidden_states" in self.kwargs else self.args[0]

    @property
    def result(self) -> torch.Tensor:
        """Its output [B, T, d_model] (the first of what it returned); None until it has returned."""
        return self.output[0] if isinstance(self.output, tuple) else self.output


class _Stop(Exception):
    """Raised once the deepest watched attention has returned, so the layers after it do not run."""


@contextlib.contextmanager
def watch_attention(model: nn.Module, layers: Iterable[int], *, stop: bool = False) -> Iterator[dict[int, AttentionCall]]:
    """Within it, what the attention module of each of `layers` receives and returns is recorded, by layer; with
    `stop`, the forward pass ends (silently, at the end of the block) once the deepest of them has returned:

        with watch_attention(model, [1, 3], stop=True) as calls:
            model(input_ids=ids, use_cache=False)
        calls[3].hidden_states, calls[3].result
    """
    arch = arch_for(model)
    blocks = arch.layer_list(model)
    layers = list(layers)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise LorsaSurgeryError(f"Layer {layer} is out of range: the model has {len(blocks)} layers.")
    calls: dict[int, AttentionCall] = {}
    deepest = max(layers, default=None)

    def watch(layer: int):
        def before(module, args, kwargs):
            calls[layer] = AttentionCall(module, args, dict(kwargs))

        def after(module, args, kwargs, output):
            calls[layer].output = output
            if stop and layer == deepest:
                raise _Stop

        return before, after

    handles = []
    for layer in layers:
        attention = getattr(blocks[layer], arch.attention)
        before, after = watch(layer)
        handles += [attention.register_forward_pre_hook(before, with_kwargs=True),
                    attention.register_forward_hook(after, with_kwargs=True)]
    try:
        yield calls
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
