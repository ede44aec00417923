"""Where attention lives in each model family, and how to read it.

One `Arch` record per family: the layer list, the attention and norm attributes, and small functions that
read the attention weights, rotary style and norm gain. `register_arch` adds a family without a release.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError


@dataclass
class AttentionWeights:
    """One attention layer's weights, per head: q [H, d, hd], k and v [Hkv, d, hd], o [H, hd, d]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    """Per-head RMS gain of queries [hd] (Qwen3, Gemma3), already including any 1 + w convention."""
    k_norm: torch.Tensor | None = None
    qk_norm_eps: float = 1e-6


@dataclass
class Arch:
    """How one model family lays out its attention."""

    name: str
    """Family name, for messages."""
    model_types: tuple[str, ...]
    """`config.model_type` values this record serves."""
    layers: str
    """Dotted path from the model to the list of decoder layers."""
    attention: str
    """Attribute of a decoder layer holding self-attention."""
    input_norm: str
    """Attribute of a decoder layer holding the norm before attention."""
    read_weights: Callable[[nn.Module, Any], AttentionWeights]
    """Reads the attention module's weights given it and the model config."""
    rotary: Callable[[Any, int], dict[str, Any]]
    """LorsaConfig fields for the positional scheme and the attention scores (scale, soft cap) of a layer, given
    the config."""
    post_attention_norm: str | None = None
    """Norm applied to the attention output before the residual add (Gemma 2/3), or None."""
    gain_plus_one: bool = False
    """RMS norms scale by 1 + weight (Gemma) rather than weight."""

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise LorsaSurgeryError(
                    f"{type(model).__name__} has no {self.layers} where {self.name} models keep their layers (a multimodal "
                    "model?); load the text model alone, or describe the layout with lorsa_surgery.register_arch(Arch(...))."
                )
        return obj

    def norm_gain(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gain, bias) of the input norm: h = gain * normalised + bias."""
        with onloaded(norm):
            weight = norm.weight.detach().float().clone()
            bias = getattr(norm, "bias", None)
            bias = None if bias is None else bias.detach().float().clone()
        return (1.0 + weight if self.gain_plus_one else weight), bias

    def attention_weights(self, attention: nn.Module, config) -> AttentionWeights:
        """The attention module's weights, per head, in float32 (read through Accelerate's offload when offloaded)."""
        with onloaded(attention):
            w = self.read_weights(attention, config)
            # Own copies: an offloaded module's weights go back to the meta device when the block ends.
            return AttentionWeights(**{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(w).items()})

    def site_names(self, layer: int) -> dict[str, str]:
        """TransformerLens-style hook names and the HF module path of a layer's attention."""
        return {
            "hook_point_in": f"blocks.{layer}.ln1.hook_normalized",
            "hook_point_out": f"blocks.{layer}.hook_attn_out",
            "hf_module": f"{self.layers}.{layer}.{self.attention}",
        }


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Within it, the weights of a module that Accelerate offloaded (to CPU or disk, leaving meta tensors in the
    module) are loaded onto its execution device; outside, nothing changes for modules that are not offloaded."""
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for sub in module.modules():
            if getattr(sub, "_hf_hook", None) is not None:
                stack.enter_context(align_module_device(sub))
        yield


ARCHS: list[Arch] = []


def register_arch(arch: Arch) -> Arch:
    """Teach lorsa-surgery a new model family (a later registration for a model_type wins)."""
    ARCHS.insert(0, arch)
    return arch


def arch_for(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise LorsaSurgeryError(
        f"{type(model).__name__} (model_type {model_type!r}) is not a supported architecture; "
        "describe it with lorsa_surgery.arch.register_arch(Arch(...))."
    )


# ---- readers ----------------------------------------------------------------------------------------


def _heads_in(weight: torch.Tensor, n: int) -> torch.Tensor:
    """nn.Linear weight [n*hd, d] -> per-head input maps [n, d, hd]."""
    out, d = weight.shape
    return weight.detach().float().view(n, out // n, d).transpose(1, 2)


def _heads_out(weight: torch.Tensor, n: int) -> torch.Tensor:
    """nn.Linear weight [d, n*hd] -> per-head output maps [n, hd, d]."""
    d, inp = weight.shape
    return weight.detach().float().T.reshape(n, inp // n, d)


def _bias(layer: nn.Module, n: int) -> torch.Tensor | None:
    b = getattr(layer, "bias", None)
    return None if b is None else b.detach().float().view(n, -1)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_counts(config) -> tuple[int, int, int]:
    c = _text_config(config)
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def read_separate_projections(attn: nn.Module, config) -> AttentionWeights:
    """q_proj / k_proj / v_proj / o_proj (Llama, Mistral, Qwen2/3, Gemma2/3, GPT-J)."""
    H, Hkv, _ = _head_counts(config)
    o = getattr(attn, "o_proj", None) or attn.out_proj
    w = AttentionWeights(
        q=_heads_in(attn.q_proj.weight, H), k=_heads_in(attn.k_proj.weight, Hkv), v=_heads_in(attn.v_proj.weight, Hkv),
        o=_heads_out(o.weight, H), q_bias=_bias(attn.q_proj, H), k_bias=_bias(attn.k_proj, Hkv),
        v_bias=_bias(attn.v_proj, Hkv), o_bias=None if o.bias is None else o.bias.detach().float(),
    )
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            gain = norm.weight.detach().float()
            setattr(w, name, 1.0 + gain if type(norm).__name__.startswith("Gemma") else gain)
            w.qk_norm_eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return w


def read_phi3(attn: nn.Module, config) -> AttentionWeights:
    H, Hkv, hd = _head_counts(config)
    qkv = attn.qkv_proj.weight
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd])
    return AttentionWeights(q=_heads_in(q, H), k=_heads_in(k, Hkv), v=_heads_in(v, Hkv), o=_heads_out(attn.o_proj.weight, H))


def read_gpt2(attn: nn.Module, config) -> AttentionWeights:
    H, _, hd = _head_counts(config)
    d = config.hidden_size
    w, b = attn.c_attn.weight.detach().float(), attn.c_attn.bias.detach().float()  # Conv1D: x @ w + b
    per_head = lambda m: m.view(d, H, hd).transpose(0, 1)  # [d, H*hd] -> [H, d, hd]
    return AttentionWeights(
        q=per_head(w[:, :d]), k=per_head(w[:, d : 2 * d]), v=per_head(w[:, 2 * d :]),
        o=attn.c_proj.weight.detach().float().view(H, hd, d),
        q_bias=b[:d].view(H, hd), k_bias=b[d : 2 * d].view(H, hd), v_bias=b[2 * d :].view(H, hd),
        o_bias=attn.c_proj.bias.detach().float(),
    )


def read_gpt_neox(attn: nn.Module, config) -> AttentionWeights:
    H, _, hd = _head_counts(config)
    d = config.hidden_size
    # Rows are grouped per head as [q_h, k_h, v_h].
    w = attn.query_key_value.weight.detach().float().view(H, 3, hd, d)
    b = attn.query_key_value.bias
    b = None if b is None else b.detach().float().view(H, 3, hd)
    dense = attn.dense
    return AttentionWeights(
        q=w[:, 0].transpose(1, 2), k=w[:, 1].transpose(1, 2), v=w[:, 2].transpose(1, 2), o=_heads_out(dense.weight, H),
        q_bias=None if b is None else b[:, 0], k_bias=None if b is None else b[:, 1], v_bias=None if b is None else b[:, 2],
        o_bias=None if dense.bias is None else dense.bias.detach().float(),
    )


# ---- positional schemes -------------------------------------------------------------------------------


def _rope_parameters(config, layer: int) -> dict[str, Any]:
    c = _text_config(config)
    params = getattr(c, "rope_parameters", None) or {}
    layer_types = getattr(c, "layer_types", None)
    if layer_types and layer_types[layer] in params:  # per-layer-type rope (Gemma 3: local vs global)
        params = params[layer_types[layer]]
    return dict(params)


def _rope_fields(config, layer: int, head_dim: int, adjacent: bool, default_partial: float = 1.0) -> dict[str, Any]:
    p = _rope_parameters(config, layer)
    rope_type = p.get("rope_type", "default")
    partial = p.get("partial_rotary_factor", getattr(_text_config(config), "partial_rotary_factor", default_partial))
    fields: dict[str, Any] = {
        "positional_embedding_type": "rotary",
        "rotary_dim": int(head_dim * partial),
        "rotary_base": float(p.get("rope_theta", getattr(_text_config(config), "rope_theta", 10000.0))),
        "rotary_adjacent_pairs": adjacent,
    }
    if rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True, NTK_by_parts_factor=p["factor"], NTK_by_parts_low_freq_factor=p["low_freq_factor"],
            NTK_by_parts_high_freq_factor=p["high_freq_factor"], old_context_len=p["original_max_position_embeddings"],
        )
    elif rope_type != "default":
        raise LorsaSurgeryError(f"Rope scaling {rope_type!r} is not supported by Lorsa (default and llama3 are).")
    return fields


def rotary_halves(config, layer: int) -> dict[str, Any]:
    """Llama-style rotary (halves), with what some members of the family add: Gemma's query_pre_attn_scalar and
    attention-logit soft cap, and SmolLM3's layers without rotary (no_rope_layers[layer] == 0)."""
    _, _, hd = _head_counts(config)
    c = _text_config(config)
    scalar = getattr(c, "query_pre_attn_scalar", None)  # Gemma scales by this instead of head_dim
    scores = {"attn_scale": float(scalar or hd) ** 0.5, "attn_logit_softcap": getattr(c, "attn_logit_softcapping", None)}
    uses_rope = getattr(c, "no_rope_layers", None)
    if uses_rope is not None and not uses_rope[layer]:
        return {"positional_embedding_type": "none", **scores}
    return {**_rope_fields(config, layer, hd, adjacent=False), **scores}


def rotary_gptj(config, layer: int) -> dict[str, Any]:
    _, _, hd = _head_counts(config)
    return {
        "positional_embedding_type": "rotary", "rotary_dim": config.rotary_dim or hd, "rotary_base": 10000.0,
        "rotary_adjacent_pairs": True, "attn_scale": float(hd) ** 0.5,
    }


def rotary_neox(config, layer: int) -> dict[str, Any]:
    _, _, hd = _head_counts(config)
    return {**_rope_fields(config, layer, hd, adjacent=False, default_partial=getattr(config, "rotary_pct", 1.0)),
            "attn_scale": float(hd) ** 0.5}


def no_rotary_gpt2(config, layer: int) -> dict[str, Any]:
    _, _, hd = _head_counts(config)
    scale = float(hd) ** 0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale *= layer + 1
    return {"positional_embedding_type": "none", "attn_scale": scale}


for _arch in (
    Arch("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3"), "model.layers", "self_attn", "input_layernorm",
         read_separate_projections, rotary_halves),
    Arch("gemma", ("gemma2", "gemma3", "gemma3_text"), "model.layers", "self_attn", "input_layernorm",
         read_separate_projections, rotary_halves, post_attention_norm="post_attention_layernorm", gain_plus_one=True),
    Arch("phi3", ("phi3",), "model.layers", "self_attn", "input_layernorm", read_phi3, rotary_halves),
    Arch("gpt2", ("gpt2",), "transformer.h", "attn", "ln_1", read_gpt2, no_rotary_gpt2),
    Arch("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "input_layernorm", read_gpt_neox, rotary_neox),
    Arch("gptj", ("gptj",), "transformer.h", "attn", "ln_1", read_separate_projections, rotary_gptj),
):
    register_arch(_arch)
