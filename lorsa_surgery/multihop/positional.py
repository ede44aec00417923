"""Positional versus symbolic heads (docs/multihop.md): the swap score, classification, attention entropy,
RoPE frequency use, discrepancy and its bounds, and a 1-hop natural-language probe for real LLMs.

The score of a head at the query (the last position n): swap the inputs of key positions i < j < n at
the head's attention input (position ids and mask unchanged), rerun only that attention module, and ask
whether the attention mass stayed in place (positional) or followed the content (symbolic). Swapping at
the attention input is the same as swapping at the block input, because the input norm acts per token.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import nn
from tqdm.auto import tqdm

from lorsa_surgery.io import files
from lorsa_surgery.host.arch import arch_for, host_rotary
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.config import LorsaConfig, rotary_inverse_wavelengths
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.hooks import watch_attention
from lorsa_surgery.host.placement import input_device
from lorsa_surgery.host.splicing import host_view


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer of a supported Hugging Face causal LM."""
    arch = arch_for(model)
    return [getattr(layer, arch.attention) for layer in arch.layer_list(model)]


def _in_host_space(model: nn.Module, modules: dict[int, Lorsa]) -> dict[int, Lorsa]:
    """The modules as they would run spliced in: processed-space checkpoints read the attention input the
    way `splice` maps them, so they are scored on the inputs they were trained for."""
    arch = arch_for(model)
    layers = arch.layer_list(model)
    return {layer: host_view(arch, layers[layer], module)[0] for layer, module in modules.items()}


def _layer_list(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = len(attention_modules(model))
    layers = list(range(n)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < n:
            raise LorsaSurgeryError(f"Layer {layer} is out of range 0..{n - 1}.")
    return layers


@contextmanager
def eager_eval(model: nn.Module):
    """Within it, the model runs eager attention (the only one that returns weights) in eval mode (no
    dropout); both are restored afterwards."""
    old_impl, was_training = model.config._attn_implementation, model.training
    if old_impl != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        if old_impl != "eager":
            model.set_attn_implementation(old_impl)
        model.train(was_training)


@dataclass
class AttentionInput:
    """What one attention module received on one prompt, enough to rerun it on altered inputs."""

    module: nn.Module
    """The attention module."""
    args: tuple
    """Its positional arguments (the hidden states may be the first)."""
    kwargs: dict
    """Its keyword arguments: mask, position ids or embeddings, as the model passed them."""
    x: torch.Tensor
    """The hidden states it read, [1, T, d_model] (after the input norm)."""
    position_ids: torch.Tensor
    """Absolute positions [1, T]."""
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """The host's (cos, sin) at those positions where a Lorsa module cannot compute them (`host.arch.host_rotary`)."""

    def mhsa_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, H, T, S] of the module on hidden states x [B, T, d_model] (inside `eager_eval`)."""
        if self.args:
            out = self.module(x, *self.args[1:], **self.kwargs)
        else:
            out = self.module(**{**self.kwargs, "hidden_states": x})
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise LorsaSurgeryError(f"{type(self.module).__name__} did not return attention weights.")
        return out[1]


def _as_prompts(input_ids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    prompts = list(input_ids) if not torch.is_tensor(input_ids) or input_ids.dim() == 2 else [input_ids]
    if not prompts:
        raise LorsaSurgeryError("No prompts given.")
    for p in prompts:
        if p.dim() != 1 or p.numel() < 3:
            raise LorsaSurgeryError("Each prompt must be a 1-D tensor of at least 3 token ids.")
    return prompts


@torch.no_grad()
def capture_attention_inputs(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int]) -> dict[int, AttentionInput]:
    """Run one prompt [T], up to the deepest of `layers`, and record what their attention modules received (inside
    `eager_eval`)."""
    with watch_attention(model, layers, stop=True) as calls:
        model(input_ids[None].to(input_device(model)), use_cache=False)
    captured = {}
    for layer, call in calls.items():
        x = call.hidden_states
        pos = call.kwargs.get("position_ids")
        pos = torch.arange(x.shape[1], device=x.device)[None] if pos is None else pos
        captured[layer] = AttentionInput(call.module, call.args, call.kwargs, x.detach(), pos,
                                         host_rotary(model, layer, pos, x.dtype))
    return captured


# ---- the swap score ---------------------------------------------------------------------------------


def swap_pairs(n_keys: int, block: int = 1, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and their pairs for a query preceded by n_keys keys.

    Returns (blocks [m, block] of key positions, pairs [P, 2] of block indices I < J). Keys are cut into
    contiguous blocks ending just before the query; the first `skip` keys, and the n_keys - skip mod block
    oldest keys after them, are never swapped.
    """
    if block < 1 or skip < 0:
        raise LorsaSurgeryError(f"block must be at least 1 and skip non-negative, got {block} and {skip}.")
    m = (n_keys - skip) // block
    if m < 2:
        raise LorsaSurgeryError(f"{n_keys} keys make fewer than two blocks of {block}; use a longer prompt.")
    blocks = torch.arange(n_keys - m * block, n_keys).view(m, block)
    return blocks, torch.combinations(torch.arange(m), 2)


def swap_batch(x: torch.Tensor, block: int = 1, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x [1, T, d] (query last) with every pair of key blocks swapped: ([1+P, T, d], blocks, pairs).

    Row 0 is the unswapped input; row 1+p has blocks pairs[p] exchanged; positions are not touched.
    """
    T = x.shape[1]
    blocks, pairs = swap_pairs(T - 1, block, skip)
    perm = torch.arange(T).repeat(len(pairs) + 1, 1)
    rows = torch.arange(1, len(pairs) + 1)[:, None]
    perm[rows, blocks[pairs[:, 0]]] = blocks[pairs[:, 1]]
    perm[rows, blocks[pairs[:, 1]]] = blocks[pairs[:, 0]]
    return x[0][perm.to(x.device)], blocks, pairs


def scores_from_rows(
    rows: torch.Tensor, blocks: torch.Tensor, pairs: torch.Tensor, tau: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_pos [H], s_sym [H]) from attention rows [1+P, H, S] at the query of the swap batch (row 0 unswapped).

    Swap weights are softmax(|d_I - d_J| / tau) over swaps; the scores are the weighted cosines of the new
    pair masses with the old ones (mass stayed) and with the old ones reversed (mass followed content).
    """
    mass = rows[..., blocks].sum(-1).double()  # [1+P, H, m]
    d, new = mass[0], mass[1:]
    I, J = pairs[:, 0], pairs[:, 1]
    v = torch.stack([d[:, I], d[:, J]], -1).transpose(0, 1)  # [P, H, 2]
    v_new = torch.stack([new[torch.arange(len(pairs)), :, I], new[torch.arange(len(pairs)), :, J]], -1)
    alpha = ((v[..., 0] - v[..., 1]).abs() / tau).softmax(0)  # [P, H]
    cos_pos = nn.functional.cosine_similarity(v_new, v, dim=-1, eps=1e-12)
    cos_sym = nn.functional.cosine_similarity(v_new, v.flip(-1), dim=-1, eps=1e-12)
    return (alpha * cos_pos).sum(0).float(), (alpha * cos_sym).sum(0).float()


def entropy(row: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of attention rows [..., S]."""
    return -(row * row.clamp_min(1e-30).log()).sum(-1)


def swap_scores(
    pattern: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    block: int = 1,
    skip: int = 0,
    tau: float = 1e-4,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_pos [H], s_sym [H], entropy [H]) of every head of `pattern` at the last position of one prompt.

    `pattern` maps inputs [B, T, d] to attention weights [B, H, T, S] (an MHSA module, a Lorsa module, or
    any function); x [1, T, d] is the unswapped input. The swap batch is run `chunk` rows at a time.
    """
    xs, blocks, pairs = swap_batch(x, block, skip)
    rows = torch.cat([pattern(xs[i : i + chunk])[:, :, -1, :].float().cpu() for i in range(0, len(xs), chunk)])
    s_pos, s_sym = scores_from_rows(rows, blocks, pairs, tau)
    return s_pos, s_sym, entropy(rows[0])


@dataclass
class HeadScores:
    """Positional and symbolic scores of the heads of some layers, averaged over prompts."""

    layers: list[int]
    """Layer index of each row."""
    positional: torch.Tensor
    """s_pos, [len(layers), heads]."""
    symbolic: torch.Tensor
    """s_sym, [len(layers), heads]."""
    entropy: torch.Tensor
    """Entropy (nats) of the query's attention row, [len(layers), heads]."""
    positional_spread: torch.Tensor | None = None
    """Standard deviation of s_pos over the prompts, [len(layers), heads]."""
    symbolic_spread: torch.Tensor | None = None
    """Standard deviation of s_sym over the prompts, [len(layers), heads]."""
    prompts: int = 0
    """How many prompts the scores average."""

    def labels(self, gamma: float = 0.1) -> list[list[str]]:
        """"positional", "symbolic" or "mixed" for every head."""
        return classify(self.positional, self.symbolic, gamma)

    def borderline(self, gamma: float = 0.1) -> list[list[bool]]:
        """Heads whose label changes when either mean score moves by two standard errors (spread / sqrt(prompts)):
        the prompts do not settle their class."""
        if self.positional_spread is None or self.prompts < 2:
            raise LorsaSurgeryError("Borderline heads need the spread of the scores over at least two prompts.")
        se_pos, se_sym = (2 * s / self.prompts**0.5 for s in (self.positional_spread, self.symbolic_spread))
        centre = self.labels(gamma)
        moved = [classify((self.positional + a * se_pos).clamp(0, 1), (self.symbolic + b * se_sym).clamp(0, 1), gamma)
                 for a in (-1, 1) for b in (-1, 1)]
        return [[any(m[r][h] != centre[r][h] for m in moved) for h in range(len(centre[r]))] for r in range(len(centre))]

    def expand(self, group_size: int) -> HeadScores:
        """Per OV head of a Lorsa module: OV head i inherits the scores of QK head i // group_size."""
        spread = lambda t: None if t is None else t.repeat_interleave(group_size, -1)
        return HeadScores(
            self.layers,
            self.positional.repeat_interleave(group_size, -1),
            self.symbolic.repeat_interleave(group_size, -1),
            self.entropy.repeat_interleave(group_size, -1),
            spread(self.positional_spread), spread(self.symbolic_spread), self.prompts,
        )

    def to_dict(self, gamma: float = 0.1) -> dict:
        out = {
            "layers": self.layers,
            "positional": self.positional.tolist(),
            "symbolic": self.symbolic.tolist(),
            "entropy": self.entropy.tolist(),
            "labels": self.labels(gamma),
            "gamma": gamma,
            "prompts": self.prompts,
        }
        if self.positional_spread is not None and self.prompts >= 2:
            out.update(positional_spread=self.positional_spread.tolist(), symbolic_spread=self.symbolic_spread.tolist(),
                       borderline=self.borderline(gamma))
        return out


def classify(s_pos: torch.Tensor, s_sym: torch.Tensor, gamma: float = 0.1) -> list:
    """Positional if s_pos >= 1-gamma and s_sym <= gamma, symbolic if the reverse, else mixed (nested lists)."""
    if not 0 <= gamma < 0.5:
        raise LorsaSurgeryError(f"gamma must be in [0, 0.5), got {gamma}.")
    pos = (s_pos >= 1 - gamma) & (s_sym <= gamma)
    sym = (s_sym >= 1 - gamma) & (s_pos <= gamma)
    codes = torch.where(pos, 1, torch.where(sym, 2, 0)).tolist()
    names = ("mixed", "positional", "symbolic")

    def name(x):
        return [name(i) for i in x] if isinstance(x, list) else names[x]

    return name(codes)


def head_scores(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[int] | None = None,
    lorsa: dict[int, Lorsa] | None = None,
    block: int = 1,
    skip: int = 0,
    tau: float = 1e-4,
    chunk: int = 256,
    progress: bool = True,
) -> HeadScores:
    """Scores of every MHSA head of `layers` (default all), or of every QK head of the Lorsa modules in
    `lorsa` ({layer: module}, reading that layer's attention input), averaged over prompts.

    input_ids is [N, T] or a list of 1-D prompts; the query is each prompt's last token. `block` > 1 swaps
    contiguous blocks of keys instead of single tokens (long prompts); the first `skip` tokens are never
    swapped (1 keeps a first-token attention sink in place, so that block parity cannot move it in some
    prompts and not in others).
    """
    prompts = _as_prompts(input_ids)
    layers = sorted(lorsa) if lorsa else _layer_list(model, layers)
    lorsa = _in_host_space(model, lorsa) if lorsa else None
    per_prompt = []
    with eager_eval(model), torch.no_grad():
        for ids in tqdm(prompts, desc="head scores", disable=not progress):
            inputs = capture_attention_inputs(model, ids, layers)
            per_layer = []
            for layer in layers:
                inp = inputs[layer]
                if lorsa:
                    module = lorsa[layer]
                    pattern = lambda xb, m=module, p=inp.position_ids, r=inp.rotary: m.attention_pattern(
                        xb, p.expand(len(xb), -1), rotary=r)
                else:
                    pattern = inp.mhsa_pattern
                per_layer.append(torch.stack(swap_scores(pattern, inp.x, block, skip, tau, chunk)))
            per_prompt.append(torch.stack(per_layer))  # [L, 3, H]
    stacked = torch.stack(per_prompt)  # [N, L, 3, H]
    mean = stacked.mean(0)
    spread = stacked.std(0) if len(prompts) > 1 else torch.zeros_like(mean)
    return HeadScores(layers, mean[:, 0], mean[:, 1], mean[:, 2], spread[:, 0], spread[:, 1], len(prompts))


# ---- RoPE frequency use and discrepancy ---------------------------------------------------------------


@dataclass
class HeadGeometry:
    """Query/key statistics of the heads of some layers at the query position, averaged over prompts."""

    layers: list[int]
    """Layer index of each row."""
    frequency_use: torch.Tensor
    """Share of each rotary plane in |q_plane| * |k_plane| (mean over keys), [L, H, planes]; rows sum to 1."""
    inv_freq: torch.Tensor
    """Rotation per position of each plane (radians), [planes]."""
    discrepancy: torch.Tensor
    """Gap between the largest and the second-largest query-key logit, in units of |q| * max|k|, [L, H]."""
    pairing: str
    """Which dimensions form a rotary plane: "interleaved" (0,1),(2,3)... or "halves" (i, i + r/2)."""
    head_letter: str = "A"
    """How its heads are named: "A" for MHSA heads (L3.A2), "QK" for the QK heads of Lorsa modules (L3.QK2)."""
    prompt_discrepancy: torch.Tensor | None = None
    """The discrepancy on each prompt, [P, L, H] (what the bounds speak of: a head's margin on one input)."""
    prompt_offset: torch.Tensor | None = None
    """How many tokens back from the query each head's most attended key is, on each prompt, [P, L, H]."""

    def dominant_frequency(self) -> torch.Tensor:
        """Per head, the rotation per position (radians) of its most used plane, [L, H]."""
        return self.inv_freq[self.frequency_use.argmax(-1)]


@dataclass
class _QK:
    """Queries and keys [H, T, d_head] of one layer on one prompt (rotated or not: plane norms agree)."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    inv_freq: torch.Tensor
    adjacent_pairs: bool


def _mhsa_qk(model: nn.Module, layer: int, inp: AttentionInput) -> _QK:
    arch = arch_for(model)
    w = arch.attention_weights(inp.module, model.config)
    x = inp.x[0].float()

    def project(weight, bias, gain, eps):
        y = torch.einsum("td,hde->hte", x, weight.to(x.device))
        if bias is not None:
            y = y + bias.to(x.device)[:, None]
        if gain is not None:
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * gain.to(x.device)
        return y

    q = project(w.q, w.q_bias, w.q_norm, w.qk_norm_eps)
    k = project(w.k, w.k_bias, w.k_norm, w.qk_norm_eps)
    fields = arch.rotary(model.config, layer)
    if fields["positional_embedding_type"] != "rotary":
        raise LorsaSurgeryError(f"{type(model).__name__} has no rotary embedding, so no frequency use.")
    cfg = LorsaConfig(d_model=x.shape[-1], n_qk_heads=1, d_qk_head=q.shape[-1], n_ov_heads=1, top_k=1, **fields)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    return _QK(q, k, 1.0 / cfg.attn_scale, rotary_inverse_wavelengths(cfg), cfg.rotary_adjacent_pairs)


def _lorsa_qk(lorsa: nn.Module, inp: AttentionInput) -> _QK:
    if lorsa.cfg.positional_embedding_type != "rotary":
        raise LorsaSurgeryError("This Lorsa module has no rotary embedding, so no frequency use.")
    q, k, _ = lorsa.project(inp.x, inp.position_ids, inp.rotary)
    return _QK(q[0].float(), k[0].float(), 1.0 / lorsa.cfg.attn_scale, lorsa.rotary_inv_freq.float().cpu(), lorsa.cfg.rotary_adjacent_pairs)


def plane_norms(x: torch.Tensor, n_planes: int, pairing: str) -> torch.Tensor:
    """Norms [..., n_planes] of the rotary planes of vectors x [..., d_head]."""
    if pairing == "interleaved":
        a, b = x[..., 0 : 2 * n_planes : 2], x[..., 1 : 2 * n_planes : 2]
    elif pairing == "halves":
        a, b = x[..., :n_planes], x[..., n_planes : 2 * n_planes]
    else:
        raise LorsaSurgeryError(f"pairing must be interleaved or halves, got {pairing!r}.")
    return (a.square() + b.square()).sqrt()


def logit_gap(row: torch.Tensor) -> torch.Tensor:
    """Gap between the largest and the second-largest logit of attention rows [..., S] (from log-weights).

    Two keys tied at the top give 0, not the gap to the next lower logit: such a head cannot single out one key,
    and the bounds are about exactly that (a positional head whose rotation comes back to the same angle ties)."""
    if row.shape[-1] < 2:
        return torch.zeros(row.shape[:-1], dtype=torch.float64)
    top2 = row.double().clamp_min(1e-300).log().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def head_geometry(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[int] | None = None,
    lorsa: dict[int, Lorsa] | None = None,
    pairing: str | None = None,
    progress: bool = True,
) -> HeadGeometry:
    """RoPE frequency use and discrepancy of every MHSA head of `layers` (or QK head of the Lorsa modules in
    `lorsa`, {layer: module}) at each prompt's last position, averaged over prompts.

    `pairing` overrides the module's own ("interleaved" for GPT-J style, "halves" for NeoX / Llama style).
    """
    prompts = _as_prompts(input_ids)
    layers = sorted(lorsa) if lorsa else _layer_list(model, layers)
    lorsa = _in_host_space(model, lorsa) if lorsa else None
    use_sum, inv_freq, used_pairing = 0.0, None, pairing
    prompt_gaps, prompt_offsets = [], []
    with eager_eval(model), torch.no_grad():
        for ids in tqdm(prompts, desc="head geometry", disable=not progress):
            inputs = capture_attention_inputs(model, ids, layers)
            uses, gaps, offsets = [], [], []
            for layer in layers:
                inp = inputs[layer]
                if lorsa:
                    qk = _lorsa_qk(lorsa[layer], inp)
                    row = lorsa[layer].attention_pattern(inp.x, inp.position_ids, rotary=inp.rotary)[0, :, -1]
                else:
                    qk = _mhsa_qk(model, layer, inp)
                    row = inp.mhsa_pattern(inp.x)[0, :, -1]
                inv_freq = qk.inv_freq
                used_pairing = pairing or ("interleaved" if qk.adjacent_pairs else "halves")
                n_planes = len(inv_freq)
                use = plane_norms(qk.q[:, -1], n_planes, used_pairing) * plane_norms(qk.k, n_planes, used_pairing).mean(1)
                uses.append(use / use.sum(-1, keepdim=True).clamp_min(1e-30))
                unit = qk.scale * qk.q[:, -1].norm(dim=-1) * qk.k.norm(dim=-1).max(-1).values
                gaps.append(logit_gap(row.float()).float().cpu() / unit.cpu())
                offsets.append(row.shape[-1] - 1 - row.argmax(-1).cpu())
            use_sum = use_sum + torch.stack(uses).cpu()
            prompt_gaps.append(torch.stack(gaps))
            prompt_offsets.append(torch.stack(offsets))
    prompt_gaps = torch.stack(prompt_gaps)
    return HeadGeometry(layers, use_sum / len(prompts), inv_freq, prompt_gaps.mean(0), used_pairing, "QK" if lorsa else "A",
                        prompt_gaps, torch.stack(prompt_offsets))


def positional_bound(n: int | torch.Tensor, theta: float | torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Upper bound on the discrepancy of an index-style (positional) head over n tokens: its query and its
    content-independent keys unit vectors in one rotary plane turning theta per position, attending `offset`
    tokens back from the query. min(1 - cos theta, 1 - cos(2 pi / (N + 1))), N = max(offset, n - 1 - offset):
    the key next to the target is only theta away, and by Dirichlet's theorem one of the offsets 1..N on the
    longer side comes back within 2 pi / (N + 1) of the target's angle. It falls as 2 pi^2 / N^2."""
    n, theta, offset = (torch.as_tensor(v, dtype=torch.float64) for v in (n, theta, offset))
    run = torch.maximum(offset, n - 1 - offset)  # 0 when there is no other key: 1 - cos(2 pi) = 0
    return torch.minimum(1 - torch.cos(theta), 1 - torch.cos(2 * math.pi / (run + 1)))


def symbolic_bound(n: int | torch.Tensor, theta: float | torch.Tensor, alphabet_size: int) -> torch.Tensor:
    """Lower bound on the discrepancy of a retrieval-style (symbolic) head over n tokens, on every input with one
    match: the keys of symbol b unit vectors at angle b * omega in one rotary plane turning theta per position,
    omega = 2 pi / alphabet_size, the query at its target's angle. With x = (n - 1) theta the match keeps a logit
    of at least cos x and every other key at most cos(omega - x), so the margin is at least
    cos x - cos(omega - x), which holds while x < omega / 2; past that nothing is guaranteed (0)."""
    n, theta = torch.as_tensor(n, dtype=torch.float64), torch.as_tensor(theta, dtype=torch.float64)
    omega = 2 * math.pi / alphabet_size
    x = (n - 1) * theta
    margin = torch.cos(x) - torch.cos(omega - x)
    return torch.where(x < omega / 2, margin, torch.zeros_like(margin))


def single_frequency_model(kind: str, theta: float, alphabet_size: int = 8, offset: int = 0, peak_logit: float = 4.0) -> nn.Module:
    """A one-layer Llama whose one head is built by hand as the single-frequency construction the bounds are
    about, for checking them (token ids are the alphabet's symbols 0..alphabet_size-1):

    - "positional": every token has the same key; the query is turned back by offset * theta, so the head
      attends `offset` tokens back from the query whatever the tokens are;
    - "symbolic": symbol b's key lies at angle b * omega (omega = 2 pi / alphabet_size) and the query at the
      angle of the symbol after its own, so the head attends to the next symbol of the alphabet wherever it is.

    Queries and keys use only the second rotary plane of a 4-dim head, whose rotation rope_theta ** -0.5 is set
    to theta; their logits are peak_logit * cos(angle between them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind not in ("positional", "symbolic"):
        raise LorsaSurgeryError(f"kind must be positional or symbolic, got {kind!r}.")
    if theta <= 0:
        raise LorsaSurgeryError(f"theta must be positive, got {theta}.")
    config = LlamaConfig(vocab_size=alphabet_size, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=4, rope_theta=theta**-2.0,
                         max_position_embeddings=1 << 16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    omega = 2 * math.pi / alphabet_size
    angles = torch.arange(alphabet_size, dtype=torch.float64) * omega
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        # Embedding rows of norm sqrt(8) (unit RMS, so the input norm leaves them as they are): dims 0-1 carry
        # the symbol's angle, dims 2-3 the same vector for every token.
        emb = model.model.embed_tokens.weight
        emb[:, 0], emb[:, 1], emb[:, 2] = 2 * torch.cos(angles), 2 * torch.sin(angles), 2.0
        attn = model.model.layers[0].self_attn
        amp = math.sqrt(peak_logit / 2)  # q and k have norm 2 * amp; logits are q.k / sqrt(head_dim = 4)
        # Head dims 1 and 3 form the plane that turns theta per position (Llama pairs dim i with i + 2).
        if kind == "positional":
            attn.k_proj.weight[1, 2] = amp
            turn = torch.tensor(-offset * theta, dtype=torch.float64)
            attn.q_proj.weight[1, 2], attn.q_proj.weight[3, 2] = amp * torch.cos(turn), amp * torch.sin(turn)
        else:
            attn.k_proj.weight[1, 0] = attn.k_proj.weight[3, 1] = amp
            c, s = math.cos(omega), math.sin(omega)  # the query is its own angle turned by omega
            attn.q_proj.weight[1, 0], attn.q_proj.weight[1, 1] = amp * c, -amp * s
            attn.q_proj.weight[3, 0], attn.q_proj.weight[3, 1] = amp * s, amp * c
    return model


def one_match_prompt(generator: torch.Generator, n: int, alphabet_size: int = 8, match_at: int | None = None,
                     rival_at: int | None = None) -> torch.Tensor:
    """Token ids [n] for the symbolic construction: random symbols ending in a query a, with exactly one a + 1
    (the symbol the head looks for) before it, at `match_at` or at random; `rival_at` puts a + 2 there, the
    symbol whose key rotation brings closest to the query's angle (with match_at=0, rival_at=1: the worst prompt)."""
    query = int(torch.randint(alphabet_size, (1,), generator=generator))
    match, rival = (query + 1) % alphabet_size, (query + 2) % alphabet_size
    others = torch.tensor([b for b in range(alphabet_size) if b != match])
    ids = others[torch.randint(len(others), (n,), generator=generator)]
    ids[-1] = query
    ids[int(torch.randint(n - 1, (1,), generator=generator)) if match_at is None else match_at] = match
    if rival_at is not None:
        ids[rival_at] = rival
    return ids


# ---- the 1-hop natural-language probe -------------------------------------------------------------------

PROBE_WORDS = """
apple river stone cloud green tiger chair bread music paper horse ocean silver pencil garden window candle
rabbit forest guitar doctor bottle winter planet yellow castle dragon butter mirror rocket summer lemon orange
basket camera pillow island violin spider carpet jacket ladder hammer honey monkey needle pepper rainbow sugar
tunnel wallet zebra anchor blanket cookie desert engine feather helmet kettle magnet parrot saddle turtle
""".split()
"""64 common words the probe draws its items from."""
PROBE_KINDS = ("count", "match")


@dataclass
class ProbePrompt:
    """One 1-hop question about a list of words."""

    text: str
    """The prompt, ending where the answer word should start."""
    answer: str
    """The correct word."""
    candidates: list[str]
    """The words the answer is chosen among (every word the question could point to)."""
    kind: str
    """"count" (count back k words: positional) or "match" (find the paired word: symbolic)."""
    separator: str
    """What comes between the prompt and the answer word (" " after "Answer:", nothing after "word-")."""


def probe_prompts(kind: str, n_items: int, n: int = 64, seed: int = 0) -> list[ProbePrompt]:
    """n 1-hop natural-language prompts over n_items words.

    "count" lists words and asks for the word k places before the last (k = 1..4): positional.
    "match" lists word pairs and asks for the partner of one left word, cueing the answer with "word-"
    (the model must find the earlier pair that starts with the same word): symbolic.
    """
    if kind not in PROBE_KINDS:
        raise LorsaSurgeryError(f"Unknown probe kind {kind!r}; choose count or match.")
    most = len(PROBE_WORDS) // (1 if kind == "count" else 2)
    if not 5 <= n_items <= most:
        raise LorsaSurgeryError(f"n_items must be between 5 and {most} for the {kind} probe.")
    rng = random.Random(f"probe:{kind}:{n_items}:{seed}")
    prompts = []
    for _ in range(n):
        words = rng.sample(PROBE_WORDS, n_items if kind == "count" else 2 * n_items)
        if kind == "count":
            k = rng.randint(1, 4)
            text = (
                f"Here is a list of words: {', '.join(words)}.\n"
                f"Question: which word comes {k} {'place' if k == 1 else 'places'} before the last word?\nAnswer:"
            )
            prompts.append(ProbePrompt(text, words[-1 - k], words, kind, " "))
        else:
            left, right = words[:n_items], words[n_items:]
            i = rng.randrange(n_items)
            text = (
                f"Here is a list of word pairs: {', '.join(f'{a}-{b}' for a, b in zip(left, right))}.\n"
                f"Question: which word is paired with {left[i]}?\nAnswer: {left[i]}-"
            )
            prompts.append(ProbePrompt(text, right[i], right, kind, ""))
    return prompts


@torch.no_grad()
def probe_accuracy(model: nn.Module, tokenizer, prompts: Sequence[ProbePrompt], progress: bool = True) -> float:
    """Share of prompts whose answer's first token scores highest among the candidates' first tokens."""
    correct = 0
    was_training = model.training
    model.eval()
    for p in tqdm(prompts, desc="probe", disable=not progress):
        firsts = [tokenizer.encode(p.separator + w, add_special_tokens=False)[0] for w in p.candidates]
        if len(set(firsts)) < len(firsts):
            raise LorsaSurgeryError("Two probe candidates share their first token; the probe cannot tell them apart.")
        ids = torch.tensor(tokenizer.encode(p.text), device=input_device(model))[None]
        logits = model(ids, use_cache=False).logits[0, -1, firsts]
        correct += p.candidates[int(logits.argmax())] == p.answer
    model.train(was_training)
    return correct / len(prompts)


def probe_input_ids(tokenizer, prompts: Sequence[ProbePrompt]) -> list[torch.Tensor]:
    """Token ids of probe prompts, for `head_scores` and `head_geometry`."""
    return [torch.tensor(tokenizer.encode(p.text)) for p in prompts]


# ---- plots --------------------------------------------------------------------------------------------




def plot_scores(scores: HeadScores, path, title: str = "", gamma: float = 0.1):
    """Every head in the (s_pos, s_sym) plane, coloured by layer, with the gamma corners marked."""
    fig = Figure(figsize=(5, 5), layout="tight")
    ax = fig.subplots()
    colors = colormaps["viridis"](torch.linspace(0, 1, len(scores.layers)).tolist())
    for row, layer in enumerate(scores.layers):
        ax.scatter(scores.positional[row], scores.symbolic[row], color=colors[row], label=f"L{layer}", s=25)
    ax.axvspan(1 - gamma, 1.02, ymax=(gamma + 0.02) / 1.04, color="tab:blue", alpha=0.15)
    ax.axhspan(1 - gamma, 1.02, xmax=(gamma + 0.02) / 1.04, color="tab:orange", alpha=0.15)
    ax.set(xlabel="positional score", ylabel="symbolic score", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7, ncol=2)
    return files.write_figure(path, fig)


def plot_frequency_use(geometry: HeadGeometry, path, labels: list[list[str]] | None = None, title: str = ""):
    """Heat map of frequency use: one row per head (fastest plane left), labelled by layer and class."""
    use = geometry.frequency_use.flatten(0, 1)  # [L*H, planes]
    names = [
        f"L{layer}.{geometry.head_letter}{h}" + (f" {labels[r][h][:3]}" if labels else "")
        for r, layer in enumerate(geometry.layers)
        for h in range(geometry.frequency_use.shape[1])
    ]
    fig = Figure(figsize=(7, 0.28 * len(names) + 1.5), layout="tight")
    ax = fig.subplots()
    im = ax.imshow(use, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="rotary plane (fast -> slow)", title=title or f"RoPE frequency use ({geometry.pairing} pairs)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return files.write_figure(path, fig)


def plot_discrepancy(curves: dict[str, tuple[list, list]], bounds: dict[str, tuple[list, list]], path, title: str = ""):
    """Measured discrepancy against input length (solid, markers) and theoretical bounds (dashed)."""
    fig = Figure(figsize=(6.5, 4), layout="tight")
    ax = fig.subplots()
    for name, (n, values) in curves.items():
        ax.plot(n, values, marker="o", ms=3, label=name)
    for name, (n, values) in bounds.items():
        ax.plot(n, values, ls="--", label=name)
    ax.set(xlabel="input tokens", ylabel="discrepancy", xscale="log", yscale="log", title=title)
    ax.xaxis.set_minor_formatter(NullFormatter())  # the log axis labels minor ticks too, over each other
    if curves or bounds:
        ax.legend(fontsize=7)
    return files.write_figure(path, fig)
