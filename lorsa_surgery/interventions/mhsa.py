"""Interventions on MHSA heads of an attention layer that carries no Lorsa module, made on the original attention.

MHSA head h is edited through the heads an exact copy of the attention would give it (`exact_copy`: QK group h, the
head's 2 x head_dim signed rank-1 parts): its slice x_h of the output projection's input becomes the activations
relu(x_h) then relu(-x_h), the edits run on those as on a spliced copy, and their difference goes back. So zero,
mean and resample ablation, scaling and patching do here exactly what they do through a copy, and a head no edit
touches comes back bit for bit.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.arch import Arch, _head_counts
from lorsa_surgery.host.hooks import HeadContext, HeadHook
from lorsa_surgery.host.splicing import CACHE_KEYWORDS, cache_keyword

OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense")
"""Where the attention modules of the families in `lorsa_surgery.host.arch` keep their output projection, whose
input is the heads' outputs side by side: Llama-like and Phi3 (o_proj), GPT-J (out_proj), GPT-2 (c_proj), GPT-NeoX
(dense)."""


def as_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., H * hd] output projection input -> [..., H * 2 hd] activations of an exact copy's heads."""
    x = x.unflatten(-1, (n_heads, -1))
    return torch.cat([x.relu(), (-x).relu()], dim=-1).flatten(-2)


def from_heads(acts: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `as_heads`: each head's positive parts minus its negative ones."""
    acts = acts.unflatten(-1, (n_heads, 2, -1))
    return (acts[..., 0, :] - acts[..., 1, :]).flatten(-2)


def output_projection(attention: nn.Module) -> nn.Module:
    """The attention module's output projection, or a refusal for a family whose projection has another name."""
    for name in OUTPUT_PROJECTIONS:
        if isinstance(getattr(attention, name, None), nn.Module):
            return getattr(attention, name)
    raise LorsaSurgeryError(f"{type(attention).__name__} has no output projection lorsa-surgery knows "
                            f"({', '.join(OUTPUT_PROJECTIONS)}), so its MHSA heads cannot be edited directly; splice an exact copy.")


def edit_heads(model: nn.Module, arch: Arch, hooks: dict[int, HeadHook]) -> Callable[[], None]:
    """At every forward, `hooks[layer](acts, ctx)` edits the exact-copy activations [B, T, H * 2 hd] of the MHSA
    heads of each layer's attention (unspliced); returns the function that takes the hooks off."""
    n_heads = _head_counts(model.config)[0]
    blocks = arch.layer_list(model)
    handles = []
    for layer, hook in hooks.items():
        attention = getattr(blocks[layer], arch.attention)
        context = _context_reader(attention, layer)
        seen: dict[str, HeadContext] = {}

        def read(module, args, kwargs, context=context, seen=seen) -> None:
            seen["ctx"] = context(args, kwargs)

        def edit(module, args, hook=hook, seen=seen) -> tuple:
            x = args[0]
            return (from_heads(hook(as_heads(x, n_heads), seen["ctx"]), n_heads).to(x.dtype), *args[1:])

        handles += [attention.register_forward_pre_hook(read, with_kwargs=True),
                    output_projection(attention).register_forward_pre_hook(edit)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def _context_reader(attention: nn.Module, layer: int) -> Callable[[tuple, dict[str, Any]], HeadContext]:
    """What a head hook knows of one call of an unspliced attention module, read from its arguments as the spliced
    layer reads them (positions counted on from the cache when the host passes none)."""
    signature = inspect.signature(attention.forward)
    keyword = cache_keyword(attention)
    layer_idx = getattr(attention, "layer_idx", layer)

    def context(args: tuple, kwargs: dict[str, Any]) -> HeadContext:
        if args:  # some blocks pass the cache or mask positionally; name them as the module does
            kw = dict(signature.bind_partial(*args, **kwargs).arguments)
            kw.update(kw.pop("kwargs", {}))
        else:
            kw = kwargs
        hidden_states = args[0] if args else kw["hidden_states"]
        cache = kw.get(keyword) if keyword else None
        if cache is None:
            cache = next((kw[k] for k in CACHE_KEYWORDS if kw.get(k) is not None), None)
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        position_ids = kw.get("position_ids")
        if position_ids is None:
            B, T = hidden_states.shape[:2]
            position_ids = torch.arange(past, past + T, device=hidden_states.device).expand(B, T)
        return HeadContext(layer, position_ids, past, kw.get("attention_mask"))

    return context
