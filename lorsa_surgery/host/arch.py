"""Where attention lives in each model family, how to read it, and the Lorsa modules built from what it reads.

One `Arch` record per family: the layer list, the attention and norm attributes, and small functions that
read the attention weights, rotary style and norm gain. `register_arch` adds a family without a release.
`exact_copy` and `from_host_subspaces` turn a host layer's weights into Lorsa modules (the exact copy, and a
training start of any size).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host import state
from lorsa_surgery.lorsa.config import LorsaConfig
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
        "describe it with lorsa_surgery.host.arch.register_arch(Arch(...))."
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
        "positional_embedding_type": "rotary", "rotary_dim": config.rotary_dim or hd,
        "rotary_base": float(getattr(config, "rope_theta", 10000.0)),
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
    layers = arch.layer_list(model)
    if not 0 <= layer < len(layers):
        raise LorsaSurgeryError(f"Layer {layer} is out of range: the model has {len(layers)} layers.")
    attention = getattr(layers[layer], arch.attention)
    attention = getattr(attention, "original", attention)  # a spliced layer still holds the host's attention
    w = arch.attention_weights(attention, model.config)
    H, Hkv, hd = _head_counts(model.config)
    kv_of = torch.arange(H) // (H // Hkv)
    d = w.q.shape[1]
    host = host_record(model)
    cfg = LorsaConfig(
        d_model=d, n_qk_heads=H, d_qk_head=hd, n_ov_heads=2 * H * hd, act_fn="relu", top_k=2 * H * hd,
        use_decoder_bias=w.o_bias is not None, use_post_qk_ln=w.q_norm is not None, qk_ln_eps=w.qk_norm_eps,
        host_model=host["id"], host_revision=host.get("revision") or host.get("sha256"), host_layer=layer,
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
        lorsa.k_norm.copy_(w.k_norm.expand(H, hd))
    if input_space == "processed":
        if arch.post_attention_norm is not None:
            raise LorsaSurgeryError(
                f"In processed coordinates a {arch.name} layer's output is taken after its post-attention norm, "
                "which attention weights alone cannot reproduce; build it with input_space='hf'."
            )
        gain, bias = arch.norm_gain(getattr(layers[layer], arch.input_norm))
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
    z = exact.hidden_pre(x.to(exact.W_Q), position_ids, attention_mask).reshape(-1, H, 2, hd)[:, :, 0]
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
