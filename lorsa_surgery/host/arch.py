"""Where attention lives in each model family, how to read it, and the Lorsa modules built from what it reads.

One `Arch` record per family: the layer list, the attention and norm attributes, and small functions that
read the attention weights, rotary style and norm gain. `register_arch` adds a family without a release.
`exact_copy` and `from_host_subspaces` turn a host layer's weights into Lorsa modules (the exact copy, and a
training start of any size).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host import state
from lorsa_surgery.lorsa.config import OWN_ROPE_TYPES, LorsaConfig
from lorsa_surgery.lorsa.model import Lorsa


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
    """RMS gain of queries, already including any 1 + w convention: [hd] per head (Qwen3, Gemma3), or [H, hd] when
    `qk_norm_full_width`."""
    k_norm: torch.Tensor | None = None
    """RMS gain of keys: [hd], or [Hkv, hd] when `qk_norm_full_width`."""
    qk_norm_eps: float = 1e-6
    qk_norm_full_width: bool = False
    """The norms take the whole projection (all heads together) before it is split into heads (OLMo 2)."""


@dataclass
class Arch:
    """How one model family lays out its attention."""

    name: str
    """Family name, for messages."""
    model_types: tuple[str, ...]
    """`config.model_type` values this record serves."""
    layers: str
    """Dotted path from the model to the list of decoder layers (a multimodal model's text layers are found under
    its `language_model` by `arch_for`)."""
    attention: str
    """Attribute of a decoder layer holding self-attention."""
    input_norm: str | None
    """Attribute of a decoder layer holding the norm before attention; None where attention reads the residual
    stream itself (OLMo 2 normalises after attention)."""
    read_weights: Callable[[nn.Module, Any], AttentionWeights]
    """Reads the attention module's weights given it and the model config."""
    rotary: Callable[[Any, int], dict[str, Any]]
    """LorsaConfig fields for the positional scheme and the attention scores (scale, soft cap) of a layer, given
    the config."""
    post_attention_norm: str | None = None
    """Norm applied to the attention output before the residual add (Gemma 2/3, OLMo 2), or None."""
    gain_plus_one: bool = False
    """RMS norms scale by 1 + weight (Gemma) rather than weight."""
    refuse_layer: Callable[[Any, int], str | None] | None = None
    """Why a layer (given the config and its index) cannot take a Lorsa module, or None when it can."""

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        layers = _module_at(model, self.layers)
        if not isinstance(layers, nn.ModuleList):
            raise LorsaSurgeryError(
                f"{type(model).__name__} has no {self.layers} where {self.name} models keep their layers; describe its "
                "layout with lorsa_surgery.register_arch(Arch(...))."
            )
        return layers

    def attention_at(self, model: nn.Module, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer` (as the host has it: spliced or not), or an error saying
        why that layer has none Lorsa can replace."""
        layers = self.layer_list(model)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layers):
            raise LorsaSurgeryError(f"Layer {layer!r} is out of range: the model has {len(layers)} layers.")
        attention = getattr(layers[layer], self.attention, None)
        why = self.refuse_layer(model.config, layer) if self.refuse_layer is not None else None
        if attention is None:
            why = (f"it is a {type(layers[layer]).__name__} without self-attention (state-space, linear-attention and "
                   "cross-attention layers have nothing Lorsa replaces)")
        if why:
            raise LorsaSurgeryError(f"Layer {layer} of {type(model).__name__} cannot take a Lorsa module: {why}.")
        return attention

    def norm_gain(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gain, bias) of the input norm: h = gain * normalised + bias."""
        with onloaded(norm):
            weight = getattr(norm, "weight", None)
            if weight is None:  # a norm without parameters (OLMo)
                weight = torch.ones(norm.normalized_shape)
            weight = weight.detach().float().clone()
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


LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "backbone.layers")
"""Where causal LMs keep their decoder layers, tried in order by the structural adapter."""
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
"""Names of a decoder layer's self-attention."""
INPUT_NORM_NAMES = ("input_layernorm", "ln_1", "ln_attn", "attention_norm", "operator_norm")
"""Names of the norm before attention."""


def _module_at(model: nn.Module, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _text_layers(model: nn.Module, path: str) -> str | None:
    """`path` if the model has a layer list there, else where a multimodal class nests it: under `language_model`
    (model.language_model.layers for Gemma 3, Mistral 3, LLaVA-style classes), or None."""
    head, _, rest = path.partition(".")
    for candidate in (path, f"{head}.language_model.{rest}", f"language_model.{path}"):
        if isinstance(_module_at(model, candidate), nn.ModuleList):
            return candidate
    return None


def _missing_mechanism(config) -> str | None:
    """What a model computes in attention that Lorsa cannot, in a phrase, or None."""
    c = _text_config(config)
    if getattr(c, "alibi", False) or getattr(c, "model_type", None) in ("bloom", "mpt"):
        return "ALiBi position biases, which Lorsa's scores do not add"
    if getattr(c, "kv_lora_rank", None):
        return "multi-head latent attention (keys and values from a shared low-rank latent, with a decoupled rotary part)"
    return None


def arch_for(model: nn.Module) -> Arch:
    """The record of a model's family, fitted to this model: an explicit record for its model_type where there is
    one, else one read from its structure (`infer_arch`); text layers nested in a multimodal class are found."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    missing = _missing_mechanism(config) if config is not None else None
    if missing:
        raise LorsaSurgeryError(f"{type(model).__name__} (model_type {model_type!r}) uses {missing}; it cannot be spliced.")
    arch = next((a for a in ARCHS if model_type in a.model_types), None)
    if arch is None:
        return infer_arch(model)
    path = _text_layers(model, arch.layers)
    if path is None:
        return arch  # layer_list says what is missing
    layers = _module_at(model, path)
    block = next((b for b in layers if hasattr(b, arch.attention)), layers[0])
    norm = arch.input_norm
    if norm is not None and not hasattr(block, norm):  # Falcon's parallel blocks call it ln_attn
        norm = next((n for n in INPUT_NORM_NAMES if hasattr(block, n)), norm)
    return dataclasses.replace(arch, layers=path, input_norm=norm)


def infer_arch(model: nn.Module) -> Arch:
    """A record read from the model's structure, for a model_type without an explicit one: the layer list at one of
    `LAYER_PATHS` (or its multimodal nesting), self-attention under one of `ATTENTION_NAMES` taking the host's rotary
    `position_embeddings`, separate or concatenated-fused projections (`read_projections`), the input norm (none when
    the layer normalises after attention, as OLMo 2 does) and a post-attention norm where the layer has one."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    unsupported = f"{name} (model_type {model_type!r}) is not a supported architecture:"
    path = next((p for p in (_text_layers(model, c) for c in LAYER_PATHS) if p is not None), None)
    if path is None:
        raise LorsaSurgeryError(
            f"{unsupported} it keeps its layers in none of the places lorsa-surgery looks ({', '.join(LAYER_PATHS)}); "
            "describe it with lorsa_surgery.register_arch(Arch(...))."
        )
    layers = _module_at(model, path)
    attention = next((a for a in ATTENTION_NAMES if any(hasattr(b, a) for b in layers)), None)
    if attention is None:
        raise LorsaSurgeryError(
            f"{unsupported} it has no self-attention layers (its layers are {type(layers[0]).__name__}: state-space or "
            "linear-attention layers have nothing Lorsa replaces)."
        )
    block = next(b for b in layers if hasattr(b, attention))
    module = getattr(block, attention)
    module = getattr(module, "original", module)  # a spliced layer still holds the host's attention
    if "position_embeddings" not in inspect.signature(module.forward).parameters:
        raise LorsaSurgeryError(
            f"{unsupported} its attention ({type(module).__name__}) takes no rotary position embeddings from the model, "
            "so its positional scheme cannot be read from its structure; describe it with lorsa_surgery.register_arch(Arch(...))."
        )
    norm = next((n for n in INPUT_NORM_NAMES if hasattr(block, n)), None)
    # Llama names the norm before the MLP post_attention_layernorm; it follows attention only where the layer
    # also has a norm of its own before the MLP (Gemma 2/3) or none before attention (OLMo 2).
    follows = hasattr(block, "post_attention_layernorm") and (norm is None or hasattr(block, "pre_feedforward_layernorm"))
    return Arch(
        model_type or name, (model_type,), path, attention, norm, read_projections, rotary_halves,
        post_attention_norm="post_attention_layernorm" if follows else None,
        gain_plus_one=norm is not None and type(getattr(block, norm)).__name__.startswith("Gemma"),
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


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_counts(config) -> tuple[int, int, int]:
    c = _text_config(config)
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return n_heads, n_kv, head_dim


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _fused(layer: nn.Module, n_heads: int, n_kv: int, hd: int, grouped: bool) -> tuple[Rows, Rows | None]:
    """The q, k and v rows (as in nn.Linear weights) of a fused projection, and of its bias: concatenated as
    [q; k; v] (Phi-3), or grouped per key-value head as [its queries, its key, its value] (GPT-NeoX, Falcon;
    one group per head without grouped-query attention)."""

    def split(t: torch.Tensor) -> Rows:
        t = t.detach().float()
        if not grouped:
            return t.split([n_heads * hd, n_kv * hd, n_kv * hd])
        g = t.view(n_kv, n_heads // n_kv + 2, hd, *t.shape[1:])
        return g[:, :-2].flatten(0, 2), g[:, -2].flatten(0, 1), g[:, -1].flatten(0, 1)

    return split(layer.weight), None if layer.bias is None else split(layer.bias)


def _from_rows(weights: Rows, biases: Rows | None, out: nn.Module, hd: int) -> AttentionWeights:
    """Per-head weights from q, k, v rows [n*hd, d] (and biases [n*hd]) and the nn.Linear output projection."""
    q, k, v = weights
    H, Hkv = q.shape[0] // hd, k.shape[0] // hd
    qb, kb, vb = (None,) * 3 if biases is None else (b.detach().float().view(-1, hd) for b in biases)
    return AttentionWeights(
        q=_heads_in(q, H), k=_heads_in(k, Hkv), v=_heads_in(v, Hkv), o=_heads_out(out.weight, H), q_bias=qb, k_bias=kb,
        v_bias=vb, o_bias=None if out.bias is None else out.bias.detach().float(),
    )


def _read_qk_norms(attn: nn.Module, w: AttentionWeights, hd: int) -> None:
    """Queries' and keys' RMS norms into `w`: per head ([hd]) or over the whole projection ([H*hd], OLMo 2)."""
    names = next((p for p in (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm")) if getattr(attn, p[0], None) is not None), None)
    if names is None:
        return
    norms = [getattr(attn, n) for n in names]
    if any(isinstance(n, nn.LayerNorm) or "RMS" not in type(n).__name__ for n in norms):
        raise LorsaSurgeryError(
            f"{type(attn).__name__} normalises queries and keys with {type(norms[0]).__name__}, a mean-centred LayerNorm "
            "that Lorsa's RMS query-key norm does not reproduce."
        )
    plus_one = type(norms[0]).__name__.startswith("Gemma")  # Gemma's RMS norms scale by 1 + weight
    gains = [n.weight.detach().float() + (1.0 if plus_one else 0.0) for n in norms]
    w.qk_norm_full_width = gains[0].numel() != hd
    w.q_norm, w.k_norm = (g.view(-1, hd) for g in gains) if w.qk_norm_full_width else gains
    w.qk_norm_eps = getattr(norms[0], "variance_epsilon", getattr(norms[0], "eps", 1e-6))


def read_projections(attn: nn.Module, config) -> AttentionWeights:
    """What most families have: q_proj / k_proj / v_proj, or one qkv_proj / Wqkv holding them as [q; k; v]; with
    o_proj, dense or out_proj; biases or not, any number of key-value heads, RMS query-key norms per head or over
    the whole projection. Refused: LayerNorm query-key norms, clipped projections (OLMo's clip_qkv)."""
    clip = getattr(_text_config(config), "clip_qkv", None)
    if clip is not None:
        raise LorsaSurgeryError(f"{type(attn).__name__} clips queries, keys and values to ±{clip} (clip_qkv), which Lorsa does not.")
    H, _, hd = _head_counts(config)
    if hasattr(attn, "q_proj"):
        hd = attn.q_proj.weight.shape[0] // H  # from the weights: not every config states head_dim
        weights = tuple(p.weight for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        biases = None if attn.q_proj.bias is None else tuple(p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    else:
        fused = next((getattr(attn, n) for n in ("qkv_proj", "Wqkv") if hasattr(attn, n)), None)
        if fused is None:
            raise LorsaSurgeryError(
                f"{type(attn).__name__} has neither q_proj/k_proj/v_proj nor a fused qkv_proj; describe it with "
                "lorsa_surgery.register_arch(Arch(...))."
            )
        weights, biases = _fused(fused, H, (fused.weight.shape[0] // hd - H) // 2, hd, grouped=False)
    out = next(getattr(attn, n) for n in ("o_proj", "dense", "out_proj") if hasattr(attn, n))
    w = _from_rows(weights, biases, out, hd)
    _read_qk_norms(attn, w, hd)
    return w


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
    return _from_rows(*_fused(attn.query_key_value, H, H, hd, grouped=True), attn.dense, hd)


def read_falcon(attn: nn.Module, config) -> AttentionWeights:
    """The three layouts of Falcon's query_key_value: grouped per key-value head (new_decoder_architecture),
    multi-query [q; k; v] with one key-value head, or grouped per head."""
    H, hd = attn.num_heads, attn.head_dim
    if attn.new_decoder_architecture:
        parts = _fused(attn.query_key_value, H, attn.num_kv_heads, hd, grouped=True)
    else:
        parts = _fused(attn.query_key_value, H, 1 if attn.multi_query else H, hd, grouped=not attn.multi_query)
    return _from_rows(*parts, attn.dense, hd)


def read_gpt_bigcode(attn: nn.Module, config) -> AttentionWeights:
    """GPT-BigCode's c_attn (an nn.Linear, unlike GPT-2's Conv1D): [q; k; v] with one key-value head under
    multi-query, else grouped per head."""
    H, hd = attn.num_heads, attn.head_dim
    parts = _fused(attn.c_attn, H, 1 if attn.multi_query else H, hd, grouped=not attn.multi_query)
    return _from_rows(*parts, attn.c_proj, hd)


def read_gpt_neo(attn: nn.Module, config) -> AttentionWeights:
    return read_projections(attn.attention, config)  # the weights sit one module down


def gpt_neo_local(config, layer: int) -> str | None:
    if config.attention_layers[layer] == "local":
        return (f"it attends within a local window of {config.window_size} tokens that its attention module applies "
                "itself, and a Lorsa module attends to every earlier token")
    return None


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
        "rope_type": rope_type,  # types other than OWN_ROPE_TYPES: the module takes the host's cos and sin
    }
    if rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True, NTK_by_parts_factor=p["factor"], NTK_by_parts_low_freq_factor=p["low_freq_factor"],
            NTK_by_parts_high_freq_factor=p["high_freq_factor"], old_context_len=p["original_max_position_embeddings"],
        )
    return fields


def host_rotary(model: nn.Module, layer: int, position_ids: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (cos, sin) the host's rotary embedding gives layer `layer`'s attention at `position_ids` [B, T] (on their
    device, in `dtype`), for running a module built from that layer outside the host; None where the module's own
    rotary is exact (`OWN_ROPE_TYPES`)."""
    rope_type = _rope_parameters(model.config, layer).get("rope_type", "default")
    if rope_type in OWN_ROPE_TYPES:
        return None
    # The rotary embedding sits beside the layer list (model.model.rotary_emb for Llama-like families).
    owner = model
    for part in arch_for(model).layers.split(".")[:-1]:
        owner = getattr(owner, part)
    rotary = getattr(owner, "rotary_emb", None)
    if rotary is None:
        raise LorsaSurgeryError(
            f"{type(model).__name__} keeps no rotary_emb beside its layers, so its {rope_type!r} rotary cannot be "
            "computed for a module run outside it; splice the module into the model instead."
        )
    # The host's rotary reads only the dtype and device of the hidden states it is given.
    probe = torch.empty(0, dtype=dtype, device=position_ids.device)
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per-layer-type rotary (Gemma 3: local, global)
        return rotary(probe, position_ids, _text_config(model.config).layer_types[layer])
    return rotary(probe, position_ids)


def rotary_halves(config, layer: int) -> dict[str, Any]:
    """Llama-style rotary (halves), with what some members of the family add: Gemma's query_pre_attn_scalar and
    attention-logit soft cap, and SmolLM3's layers without rotary (no_rope_layers[layer] == 0)."""
    _, _, hd = _head_counts(config)
    c = _text_config(config)
    scalar = getattr(c, "query_pre_attn_scalar", None)  # Gemma scales by this instead of head_dim
    multiplier = getattr(c, "attention_multiplier", None)  # Granite multiplies scores by this instead
    scale = 1.0 / multiplier if multiplier else float(scalar or hd) ** 0.5
    scores = {"attn_scale": scale, "attn_logit_softcap": getattr(c, "attn_logit_softcapping", None)}
    uses_rope = getattr(c, "no_rope_layers", None)
    if uses_rope is not None and not uses_rope[layer]:
        return {"positional_embedding_type": "none", **scores}
    return {**_rope_fields(config, layer, hd, adjacent=False), **scores}


def rotary_pairs(config, layer: int) -> dict[str, Any]:
    """`rotary_halves` with adjacent pairs (0,1),(2,3)... (Cohere)."""
    fields = rotary_halves(config, layer)
    return {**fields, "rotary_adjacent_pairs": True} if fields["positional_embedding_type"] == "rotary" else fields


def rotary_gptj(config, layer: int) -> dict[str, Any]:
    _, _, hd = _head_counts(config)
    return {
        "positional_embedding_type": "rotary", "rotary_dim": config.rotary_dim or hd,
        "rotary_base": float(getattr(config, "rope_theta", 10000.0)),
        "rotary_adjacent_pairs": True, "attn_scale": float(hd) ** 0.5,
    }


def rotary_neox(config, layer: int) -> dict[str, Any]:
    _, _, hd = _head_counts(config)
    return {**_rope_fields(config, layer, hd, adjacent=False, default_partial=getattr(config, "rotary_pct", 1.0)),
            "attn_scale": float(hd) ** 0.5}


def no_rotary_gpt2(config, layer: int) -> dict[str, Any]:
    """Learned absolute positions (GPT-2, GPT-BigCode, GPT-Neo); scores scaled by sqrt(head_dim) only where the
    config says so (GPT-Neo never scales them)."""
    _, _, hd = _head_counts(config)
    scale = float(hd) ** 0.5 if getattr(config, "scale_attn_weights", False) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale *= layer + 1
    return {"positional_embedding_type": "none", "attn_scale": scale}


# Families the structural adapter (`infer_arch`) does not read right: other norm or rotary conventions, fused
# layouts that head counts alone do not split, learned positions.
for _arch in (
    Arch("gemma", ("gemma2", "gemma3", "gemma3_text"), "model.layers", "self_attn", "input_layernorm",
         read_projections, rotary_halves, post_attention_norm="post_attention_layernorm", gain_plus_one=True),
    Arch("cohere", ("cohere",), "model.layers", "self_attn", "input_layernorm", read_projections, rotary_pairs),
    Arch("falcon", ("falcon",), "transformer.h", "self_attention", "input_layernorm", read_falcon, rotary_halves),
    Arch("gpt2", ("gpt2",), "transformer.h", "attn", "ln_1", read_gpt2, no_rotary_gpt2),
    Arch("gpt_bigcode", ("gpt_bigcode",), "transformer.h", "attn", "ln_1", read_gpt_bigcode, no_rotary_gpt2),
    Arch("gpt_neo", ("gpt_neo",), "transformer.h", "attn", "ln_1", read_gpt_neo, no_rotary_gpt2, refuse_layer=gpt_neo_local),
    Arch("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "attention", "input_layernorm", read_gpt_neox, rotary_neox),
    Arch("gptj", ("gptj",), "transformer.h", "attn", "ln_1", read_projections, rotary_gptj),
):
    register_arch(_arch)


def host_record(model) -> dict[str, Any]:
    """The base record of a loaded model: the one `load_model` attached, else its config's name, reduced to the
    last component when it is a local path (a path would leak into shared checkpoints)."""
    record = state.get(model, "base")
    if record is not None:
        return record
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is not None and Path(name).expanduser().exists():
        name = Path(name).expanduser().resolve().name
    return {"id": name, "revision": None}


# ---- Lorsa modules from a host layer ----------------------------------------------------------------------


@torch.no_grad()
def exact_copy(model: nn.Module, layer: int, input_space: str = "hf") -> Lorsa:
    """A Lorsa that reproduces a host attention layer exactly.

    Each MHSA head's OV circuit is split into rank-1 heads along its head dimension, two signed copies
    each so that ReLU keeps the sign; all heads fire (act_fn relu). QK head h is MHSA head h (key
    heads repeated for grouped-query attention). The known-answer case for splicing and a training
    initialisation. With input_space="processed" the input norm's gain and bias are folded in, as in
    TransformerLens processed checkpoints.
    """
    arch = arch_for(model)
    if input_space == "processed" and arch.input_norm is None:
        raise LorsaSurgeryError(
            f"A {arch.name} layer has no norm before attention, so there are no processed coordinates to build in; "
            "build it with input_space='hf'."
        )
    attention = arch.attention_at(model, layer)
    attention = getattr(attention, "original", attention)  # a spliced layer still holds the host's attention
    w = arch.attention_weights(attention, model.config)
    (H, _, hd), Hkv = w.q.shape, w.k.shape[0]
    kv_of = torch.arange(H) // (H // Hkv)
    d = w.q.shape[1]
    host = host_record(model)
    cfg = LorsaConfig(
        d_model=d, n_qk_heads=H, d_qk_head=hd, n_ov_heads=2 * H * hd, act_fn="relu", top_k=2 * H * hd,
        use_decoder_bias=w.o_bias is not None, use_post_qk_ln=w.q_norm is not None, qk_ln_eps=w.qk_norm_eps,
        qk_ln_full_width=w.qk_norm_full_width, host_model=host["id"], host_revision=host.get("revision") or host.get("sha256"), host_layer=layer,
        **arch.rotary(model.config, layer), **{k: v for k, v in arch.site_names(layer).items() if k != "hf_module"},
    )
    lorsa = Lorsa(cfg)
    zeros = torch.zeros(H, hd)
    lorsa.W_Q.copy_(w.q)
    lorsa.W_K.copy_(w.k[kv_of])
    lorsa.b_Q.copy_(zeros if w.q_bias is None else w.q_bias)
    lorsa.b_K.copy_(zeros if w.k_bias is None else w.k_bias[kv_of])
    v = w.v[kv_of].transpose(1, 2)  # [H, hd, d]: one value direction per head dimension
    v_bias = zeros if w.v_bias is None else w.v_bias[kv_of]
    lorsa.W_V.copy_(torch.cat([v, -v], dim=1).reshape(-1, d))
    lorsa.b_V.copy_(torch.cat([v_bias, -v_bias], dim=1).reshape(-1))
    lorsa.W_O.copy_(torch.cat([w.o, -w.o], dim=1).reshape(-1, w.o.shape[-1]))
    if w.o_bias is not None:
        lorsa.b_D.copy_(w.o_bias)
    if w.q_norm is not None:
        lorsa.q_norm.copy_(w.q_norm.expand(H, hd))
        lorsa.k_norm.copy_(w.k_norm[kv_of] if w.qk_norm_full_width else w.k_norm.expand(H, hd))
    if input_space == "processed":
        if arch.post_attention_norm is not None:
            raise LorsaSurgeryError(
                f"In processed coordinates a {arch.name} layer's output is taken after its post-attention norm, "
                "which attention weights alone cannot reproduce; build it with input_space='hf'."
            )
        gain, bias = arch.norm_gain(getattr(arch.layer_list(model)[layer], arch.input_norm))
        lorsa = lorsa.in_input_space("processed", gain, bias)
    return lorsa


EXTRA_READ_SCALE = 0.3
"""How strongly the extra directions of an oversized group read their input. Directions in one hd-dimensional
subspace overlap, and top-K adds up every one that fires, so at full strength they overshoot (SmolLM2 layer 3,
2304 heads, K 32, 20k tokens: held-out explained variance 0.47); at 0.3 they fire where they fit best (0.69, 25%
dead heads; 100k tokens: 0.764, 9% dead), and left random they never fire (0.769 at 100k, but 50% dead)."""


@torch.no_grad()
def from_host_subspaces(model: nn.Module, layer: int, n_qk_heads: int, n_ov_heads: int, x: torch.Tensor,
                        position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        token_mask: torch.Tensor | None = None, seed: int = 0) -> Lorsa:
    """A training start of any size: each QK group copies one MHSA head's Q/K, and its OV heads are that head's
    principal output directions on the attention inputs `x` [B, T, d] (HF coordinates; `token_mask` [B, T] picks
    the tokens to measure on).

    An MHSA head's output lies in an hd-dimensional subspace. Rotating its head dimension onto the principal
    axes of the output it actually writes (attention-mixed values through W_O) keeps the head exact while
    ordering its rank-1 parts by the variance they carry, so top-K keeps the parts that matter. Each part
    becomes two signed heads (ReLU keeps one sign); a group bigger than the 2 x hd parts of its head gets
    more directions drawn at random in the same subspace, reading at `EXTRA_READ_SCALE`; QK groups that share a
    host head (more QK heads than the host has) take its parts in turn. 2 x heads x hd heads over the host's
    QK heads reproduce the layer exactly, as `exact_copy` does. All heads fire (act_fn relu) until the caller
    says otherwise.
    """
    exact = exact_copy(model, layer)
    H, hd, d = exact.cfg.n_qk_heads, exact.cfg.d_qk_head, exact.cfg.d_model
    if n_ov_heads % n_qk_heads:
        raise LorsaSurgeryError(f"The number of heads ({n_ov_heads}) must be a multiple of the QK heads ({n_qk_heads}).")
    group = n_ov_heads // n_qk_heads
    x = x.to(exact.W_Q)
    if position_ids is None:
        position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    position_ids = position_ids.to(x.device)
    rotary = host_rotary(model, layer, position_ids, x.dtype)
    z = exact.hidden_pre(x, position_ids, attention_mask, rotary=rotary).reshape(-1, H, 2, hd)[:, :, 0]
    if token_mask is not None:
        z = z[token_mask.reshape(-1).bool().to(z.device)]
    w_v, w_o = exact.W_V.view(H, 2, hd, d)[:, 0], exact.W_O.view(H, 2, hd, d)[:, 0]
    b_v = exact.b_V.view(H, 2, hd)[:, 0]
    host_of = torch.arange(n_qk_heads) * H // n_qk_heads  # contiguous blocks of copies when n_qk is a multiple of H
    lorsa = Lorsa(dataclasses.replace(exact.cfg, n_qk_heads=n_qk_heads, n_ov_heads=n_ov_heads, top_k=n_ov_heads))
    for name in ("W_Q", "W_K", "b_Q", "b_K") + (("q_norm", "k_norm") if exact.cfg.use_post_qk_ln else ()):
        lorsa.get_parameter(name).copy_(exact.get_parameter(name)[host_of])
    if exact.b_D is not None:
        lorsa.b_D.copy_(exact.b_D)
    generator = torch.Generator().manual_seed(seed)
    W_V, W_O, b_V = lorsa.W_V.view(n_qk_heads, group, d), lorsa.W_O.view(n_qk_heads, group, d), lorsa.b_V.view(n_qk_heads, group)
    for h in host_of.unique().tolist():
        groups = (host_of == h).nonzero().flatten().tolist()
        pairs = len(groups) * math.ceil(group / 2)
        values = z[:, h].double()
        evals, evecs = torch.linalg.eigh(values.T @ values / max(len(values), 1))
        root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        axes = torch.linalg.svd(root @ w_o[h].double(), full_matrices=False).Vh  # [hd, d], by falling variance
        directions = axes[: min(pairs, hd)]
        reads_scale = torch.ones(pairs, dtype=torch.float64)
        if pairs > hd:
            extra = torch.randn(pairs - hd, hd, generator=generator, dtype=torch.float64) @ axes
            directions = torch.cat([directions, extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-30)])
            reads_scale[hd:] = EXTRA_READ_SCALE
        coefficient = directions @ w_o[h].double().T  # [pairs, hd]: how each direction reads the head dimension
        reads, biases = coefficient @ w_v[h].double() * reads_scale[:, None], coefficient @ b_v[h].double() * reads_scale
        for p in range(pairs):
            g, slot = groups[p % len(groups)], 2 * (p // len(groups))
            for sign, i in ((1.0, slot), (-1.0, slot + 1)):
                if i < group:
                    W_V[g, i], W_O[g, i], b_V[g, i] = sign * reads[p], sign * directions[p], sign * biases[p]
    return lorsa


@torch.no_grad()
def provenance(model: nn.Module, layer: int, lorsa: Lorsa) -> dict[str, torch.Tensor]:
    """How each Lorsa head's OV circuit spreads over the host layer's MHSA heads.

    A head's output direction W_O[i] is written as a sum of parts, one in each MHSA head's output subspace (rows of
    its W_O), by least squares over all the heads' rows together; "output" [n, H] is each part's share of the summed
    squared norms. "value" [n, Hkv] does the same for the value direction W_V[i] over the key-value heads' value
    subspaces (grouped-query heads share theirs). Both rows sum to 1. In HF input coordinates."""
    arch = arch_for(model)
    attention = getattr(arch.layer_list(model)[layer], arch.attention)
    w = arch.attention_weights(getattr(attention, "original", attention), model.config)
    module = lorsa.in_input_space("hf", *arch.norm_gain(getattr(arch.layer_list(model)[layer], arch.input_norm))) \
        if lorsa.cfg.input_space != "hf" else lorsa

    def shares(directions: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        n_blocks, width, d = blocks.shape
        basis = blocks.reshape(-1, d).double()  # [n_blocks * width, d]
        coef = torch.linalg.lstsq(basis.T, directions.double().T).solution.T  # [n, n_blocks * width]
        parts = torch.einsum("nbk,bkd->nbd", coef.view(-1, n_blocks, width), blocks.double())
        energy = parts.pow(2).sum(-1)
        return (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).float()

    return {"output": shares(module.W_O.detach().cpu(), w.o), "value": shares(module.W_V.detach().cpu(), w.v.transpose(1, 2))}
