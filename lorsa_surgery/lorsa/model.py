"""Lorsa, low-rank sparse attention: the module and its rotary embedding, in one file (its config: `config.py`).

A Lorsa module reads what one attention layer reads and reproduces what it writes, with many rank-1 OV
heads of which only a few fire at each token. OV head i shares query-key head i // group_size.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.io import files
from lorsa_surgery.lorsa import formats
from lorsa_surgery.lorsa.config import LorsaConfig, rotary_inverse_wavelengths

Rotary = tuple[torch.Tensor, torch.Tensor]
"""The (cos, sin) a host computes for its attention, each [B, T, rotary_dim] (or [T, rotary_dim]), in the layout the
module rotates with: halves (cat(freqs, freqs)), or adjacent pairs (each frequency twice in a row) when
`rotary_adjacent_pairs`; any attention scaling the rotary type has (yarn, longrope) already folded in."""

class KVStore(Protocol):
    """Where an incremental run keeps keys [B, n_qk, S, d_qk] and values [B, n_qk, S, group]."""

    def seq_length(self) -> int: ...

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LorsaCache:
    """A minimal KVStore for running a Lorsa module on its own one chunk at a time."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def seq_length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Taps(Protocol):
    """Places inside the forward pass where a caller reads or replaces what is computed (the splice's hook points)."""

    wants_pattern: bool
    """Whether `pattern` is to be called, which materialises the pattern instead of running a fused kernel."""

    def qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This call's queries and keys [B, n_qk, T, d_qk] and values [B, n_qk, T, group], before the cache."""
        ...

    def pattern(self, pattern: torch.Tensor) -> torch.Tensor:
        """The attention of every QK head [B, n_qk, T, S]."""
        ...


class Rotate(torch.autograd.Function):
    """Rotary embedding of x [..., d] by cos and sin [..., rotary_dim] (halves, or adjacent pairs); dimensions past
    rotary_dim pass unrotated.

    Written half by half into one new tensor, forward and backward: the textbook x * cos + rotate_half(x) * sin makes
    four tensors as large as x each way, and allocating them costs more than the arithmetic.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.adjacent = adjacent
        return Rotate.turn(x, cos, sin, adjacent, inverse=False, training=ctx.needs_input_grad[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return Rotate.turn(grad, cos, sin, ctx.adjacent, inverse=True, training=True), None, None, None

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool, inverse: bool, training: bool) -> torch.Tensor:
        """R x, or its transpose R^T x (the backward): (x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2); in scratch memory
        when `training`."""
        rd = cos.shape[-1]
        out = SCRATCH.empty(x.shape, x) if training else torch.empty_like(x)
        out[..., rd:] = x[..., rd:]
        rotated = torch.mul(x[..., :rd], cos, out=out[..., :rd])
        halves = (lambda t: t.unflatten(-1, (-1, 2)).unbind(-1)) if adjacent else (lambda t: t.unflatten(-1, (2, -1)).unbind(-2))
        (x1, x2), (o1, o2), (s1, s2) = halves(x[..., :rd]), halves(rotated), halves(sin)
        sign = 1.0 if inverse else -1.0
        if inverse:  # R^T: (x1 c1 + x2 s2, x2 c2 - x1 s1)
            s1, s2 = s2, s1
        # Products rounded before the sum, as x * cos + rotate_half(x) * sin rounds them: the same bits.
        o1.add_(x2 * s1, alpha=sign)
        o2.add_(x1 * s2, alpha=-sign)
        return out


def training_on_cpu(x: torch.Tensor) -> bool:
    """Whether x is computed on CPU for a backward, without autocast: where this module's own training operations
    apply (autocast would change their products' dtypes under them)."""
    return torch.is_grad_enabled() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


class Scratch:
    """Memory for the large tensors of a CPU training step (projections, rotated queries and keys, z, and their
    gradients), handed out again once nothing else holds it.

    A fresh tensor of tens of MB comes from the system as untouched pages, and faulting them in costs about as much as
    the product that fills it. A buffer is handed out again only while the scratch is its storage's sole holder, so
    nothing kept by a caller or by a graph awaiting its backward is ever overwritten. Other devices' allocators keep
    freed memory themselves and get fresh tensors.
    """

    LIMIT = 1 << 29
    """The most memory kept; free buffers of other shapes make room for new ones, and past it new ones are not kept."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []
        self.lock = threading.Lock()

    @staticmethod
    def _unheld(t: torch.Tensor) -> bool:
        # The count includes the storage object asked for here; torch has no public way to ask it.
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape` with like's dtype and device; always a view of what is kept, so that
        holding it counts as holding the buffer."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = math.prod(shape)
        with self.lock:
            free = [t for t in self.kept if self._unheld(t)]
            for t in free:
                if t.numel() == numel and t.dtype == like.dtype:
                    return t.view(shape)
            t = like.new_empty(numel)
            if t.nbytes <= self.LIMIT:
                room = self.LIMIT - t.nbytes - sum(k.nbytes for k in self.kept)
                for old in free:
                    if room >= 0:
                        break
                    self.kept = [k for k in self.kept if k is not old]
                    room += old.nbytes
                if room >= 0:
                    self.kept.append(t)
            return t.view(shape)


SCRATCH = Scratch()


class Linear(torch.autograd.Function):
    """F.linear(x, weight, bias) for training on CPU, written into scratch memory (see `Scratch`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = SCRATCH.empty((*x.shape[:-1], weight.shape[0]), x)
        torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t(), out=out.view(-1, weight.shape[0]))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad
        return (
            (grad @ weight).view(x.shape) if wants_x else None,
            grad.t() @ x.reshape(-1, x.shape[-1]) if wants_weight else None,
            grad.sum(0) if wants_bias else None,
        )


class Pick(torch.autograd.Function):
    """z.gather(-1, idx) for training on CPU, its gradient (zero but at idx) written into scratch memory."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape = z.shape
        return z.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        return SCRATCH.empty(ctx.shape, grad).zero_().scatter_add_(-1, idx, grad), None


class GroupAttention(torch.autograd.Function):
    """Causal attention of each QK head over values several times as wide as its queries, for training on CPU:
    q, k [B, n_qk, T, d_qk] and v [B, n_qk, T, group] give z [B, T, n_qk, group].

    The fused CPU kernel wants values as wide as queries, so it runs once per slice of a group, computing the pattern,
    and in the backward its gradient, once per slice: 40% of a training step at SmolLM2's size. Here the pattern is
    computed once per group and kept for the backward, a block of queries and a few heads at a time so that each
    block stays in cache, skipping the keys a block of queries cannot see.
    """

    HEADS = 18
    """Most heads per block, split evenly: with 128 queries over 256 keys, a pattern block of 2.4 MB."""
    QUERIES = 128
    PATTERN_BYTES = 1 << 30
    """The most memory the kept patterns may take; longer sequences use the fused kernel instead."""

    @staticmethod
    def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether this is the training of a float32 CPU module (without autocast) over whole sequences with groups
        wider than queries (a multiple of them) and patterns that fit in PATTERN_BYTES; a GPU's kernels are left to do
        their own."""
        (B, H, T, d), group = q.shape, v.shape[-1]
        return (
            training_on_cpu(q) and any(t.requires_grad for t in (q, k, v)) and q.dtype == torch.float32
            and 1 < T == k.shape[2] and group > d and group % d == 0
            and B * H * T * T * q.element_size() <= GroupAttention.PATTERN_BYTES
        )

    @staticmethod
    def blocks(B: int, H: int, T: int, device: torch.device):
        """(b, heads, blocks) per group of heads of one sequence, with blocks its (start, end, future) of queries: the
        queries' span and the mask of keys after each query, the last block, which sees every key, first."""
        per_block = math.ceil(H / math.ceil(H / GroupAttention.HEADS))
        starts = list(reversed(range(0, T, GroupAttention.QUERIES)))
        ends = [min(start + GroupAttention.QUERIES, T) for start in starts]
        futures = [torch.ones(e - s, e, dtype=torch.bool, device=device).triu_(s + 1) for s, e in zip(starts, ends)]
        for b in range(B):
            for h in range(0, H, per_block):
                yield b, slice(h, h + per_block), list(zip(starts, ends, futures))

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, T, _ = q.shape
        z = SCRATCH.empty((B, T, H, v.shape[-1]), q)
        patterns = []
        # Values and outputs interleave heads in memory; each group's are copied to and from contiguous blocks, on
        # which the products run faster than the copies cost.
        for b, heads, blocks in GroupAttention.blocks(B, H, T, q.device):
            values, out = v[b, heads].contiguous(), z[b, :, heads].transpose(0, 1)
            for start, end, future in blocks:
                p = torch.bmm(q[b, heads, start:end], k[b, heads, :end].transpose(1, 2))
                p = torch.softmax(p.mul_(scale).masked_fill_(future, float("-inf")), dim=-1)
                out[:, start:end] = torch.bmm(p, values[:, :end])
                patterns.append(p)
        ctx.save_for_backward(q, k, v, z, *patterns)
        ctx.scale = scale
        return z

    @staticmethod
    def backward(ctx, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, z, *patterns = ctx.saved_tensors
        B, H, T, _ = q.shape
        dq, dk = SCRATCH.empty(q.shape, q), SCRATCH.empty(k.shape, k)
        dv = SCRATCH.empty(v.transpose(1, 2).shape, v)  # laid out as the projection made v: no copy later
        patterns = iter(patterns)
        for b, heads, blocks in GroupAttention.blocks(B, H, T, q.device):
            values, grads = v[b, heads].contiguous(), dz[b, :, heads].transpose(0, 1).contiguous()
            # The softmax's backward needs rowsum(dZ * Z) per query.
            delta = torch.linalg.vecdot(grads, z[b, :, heads].transpose(0, 1)).unsqueeze(-1)
            dvalues = torch.empty_like(values)
            for start, end, _ in blocks:
                p = next(patterns)
                beta = float(end < T)  # the first block sees every key: its products write dk and dv, the rest add
                dvalues[:, :end].baddbmm_(p.transpose(1, 2), grads[:, start:end], beta=beta)
                # dS = P * (dZ V^T - rowsum(dZ * Z)), scaled as the scores were.
                ds = torch.bmm(grads[:, start:end], values[:, :end].transpose(1, 2))
                ds.sub_(delta[:, start:end]).mul_(p).mul_(ctx.scale)
                torch.bmm(ds, k[b, heads, :end], out=dq[b, heads, start:end])
                dk[b, heads, :end].baddbmm_(ds.transpose(1, 2), q[b, heads, start:end], beta=beta)
            dv[b, :, heads] = dvalues.transpose(0, 1)
        return dq, dk, dv.transpose(1, 2), None


class Lorsa(nn.Module):
    """Low-rank sparse attention: `lorsa(x)` reconstructs the attention output from its input.

    Parameters use the reference names: W_Q, W_K [n_qk, d_model, d_qk]; b_Q, b_K [n_qk, d_qk];
    W_V, W_O [n_ov, d_model]; b_V [n_ov]; b_D [d_model]; optional q_norm, k_norm [n_qk, d_qk] and
    log_jumprelu_threshold [n_ov].
    """

    def __init__(self, cfg: LorsaConfig):
        super().__init__()
        self.cfg = cfg
        n_qk, d, dq, n = cfg.n_qk_heads, cfg.d_model, cfg.d_qk_head, cfg.n_ov_heads
        self.W_Q = nn.Parameter(torch.empty(n_qk, d, dq))
        self.W_K = nn.Parameter(torch.empty(n_qk, d, dq))
        self.b_Q = nn.Parameter(torch.zeros(n_qk, dq))
        self.b_K = nn.Parameter(torch.zeros(n_qk, dq))
        self.W_V = nn.Parameter(torch.empty(n, d))
        self.b_V = nn.Parameter(torch.zeros(n))
        self.W_O = nn.Parameter(torch.empty(n, d))
        self.b_D = nn.Parameter(torch.zeros(d)) if cfg.use_decoder_bias else None
        if cfg.use_post_qk_ln:
            self.q_norm = nn.Parameter(torch.ones(n_qk, dq))
            self.k_norm = nn.Parameter(torch.ones(n_qk, dq))
        if cfg.act_fn == "jumprelu":
            self.log_jumprelu_threshold = nn.Parameter(torch.zeros(n))
        self.register_buffer("rotary_inv_freq", rotary_inverse_wavelengths(cfg), persistent=False)
        self.catalog: dict[int, dict[str, str]] = {}
        """Head catalog: head index -> {"label": ..., "note": ...}; saved beside the weights."""
        self.origin: dict[str, Any] = {}
        """Where this module was loaded from (format, path, folded norms); empty for a new module."""
        self.training_info: dict[str, Any] = {}
        """How the module was trained and what it scored (tokens, K, explained variance, LM loss change...);
        saved as training.json and shown in model cards."""
        self._derived_cache: dict[str, tuple[tuple, Any]] = {}
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Whatever the module is cast to, rotary frequencies stay float32: positions times a bfloat16 frequency
        # drift far from the host's angles.
        super()._apply(fn, recurse)
        self.rotary_inv_freq = rotary_inverse_wavelengths(self.cfg).to(self.W_Q.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d, n = self.cfg.d_model, self.cfg.n_ov_heads
        nn.init.normal_(self.W_Q, std=d**-0.5)
        nn.init.normal_(self.W_K, std=d**-0.5)
        nn.init.normal_(self.W_V, std=n**-0.5)
        nn.init.normal_(self.W_O, std=d**-0.5)

    # ---- the forward pass, in pieces -------------------------------------------------------------

    def _derived(self, name: str, params: tuple[nn.Parameter, ...], build):
        """A tensor derived from parameters, rebuilt only when one of them changed (or gradients are needed),
        so decode steps reuse it instead of recomputing it per token. A change is seen through the parameters'
        version counters, which writes through `.data` and fused optimizers leave alone."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        # Tensors built under inference mode cannot enter a later autograd graph (e.g. a frozen module in a
        # model being fine-tuned), so the mode is part of the key.
        key = (torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        cached = self._derived_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._derived_cache[name] = (key, build())
        return cached[1]

    def _qk_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_Q and W_K as [n_qk * d_qk, d_model] matrices."""
        d = self.cfg.d_model
        return self._derived(
            "qk", (self.W_Q, self.W_K), lambda: (self.W_Q.transpose(1, 2).reshape(-1, d), self.W_K.transpose(1, 2).reshape(-1, d))
        )

    def _cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype, rotary: Rotary | None) -> Rotary:
        """cos and sin [B, T, 1, rotary_dim] at absolute positions [B, T]: the host's `rotary` when given, else from
        the module's own frequencies, which only types that are not `host_rotary` have."""
        if rotary is not None:
            cos, sin = rotary
            if cos.shape[-1] != self.cfg.rotary_dim:
                raise LorsaSurgeryError(
                    f"The host's rotary covers {cos.shape[-1]} dimensions but this module rotates {self.cfg.rotary_dim}."
                )
            return cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)
        if self.cfg.host_rotary:
            raise LorsaSurgeryError(
                f"This module's rotary of type {self.cfg.rope_type!r} is computed by the host; run it spliced into its "
                "host, or pass rotary=(cos, sin)."
            )
        angles = position_ids.to(torch.float32)[:, :, None, None] * self.rotary_inv_freq.float()
        if self.cfg.rotary_adjacent_pairs:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        """Rotary embedding of x [B, T, n_qk, d_qk] at absolute positions [B, T] (see `_cos_sin`)."""
        return self._apply_rotary(x, *self._cos_sin(position_ids, x.dtype, rotary))

    def _apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return Rotate.apply(x, cos, sin, self.cfg.rotary_adjacent_pairs)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        over = (-2, -1) if self.cfg.qk_ln_full_width else (-1,)  # x is [B, T, n_qk, d_qk]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(over, keepdim=True) + self.cfg.qk_ln_eps)
        return (x32 * weight.float()).to(x.dtype)

    def project(
        self, x: torch.Tensor, position_ids: torch.Tensor, rotary: Rotary | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys [B, n_qk, T, d_qk] (normed, and rotated by the host's `rotary` when given, else by the
        module's own) and values [B, n_qk, T, group]."""
        cfg = self.cfg
        B, T, _ = x.shape
        w_q, w_k = self._qk_weights()
        x = x.to(self.W_V.dtype)
        # Three products, not one over concatenated weights: training would concatenate the weights, and their
        # gradients, at every step, which costs more than one larger product saves.
        linear = Linear.apply if training_on_cpu(x) else F.linear
        q, k, v = linear(x, w_q, self.b_Q.flatten()), linear(x, w_k, self.b_K.flatten()), linear(x, self.W_V, self.b_V)
        # Normed and rotated as the products lay them out, [B, T, n_qk, d_qk]: elementwise work on the transposed
        # view runs several times slower.
        q, k = q.reshape(B, T, cfg.n_qk_heads, cfg.d_qk_head), k.reshape(B, T, cfg.n_qk_heads, cfg.d_qk_head)
        if cfg.use_post_qk_ln:
            q, k = self._rms(q, self.q_norm), self._rms(k, self.k_norm)
        if cfg.positional_embedding_type == "rotary":
            cos, sin = self._cos_sin(position_ids, q.dtype, rotary)
            q, k = self._apply_rotary(q, cos, sin), self._apply_rotary(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.reshape(B, T, cfg.n_qk_heads, cfg.group_size).transpose(1, 2)

    def _attend_inputs(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVStore | None,
        taps: Taps | None = None,
        rotary: Rotary | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries, all keys and values (cached ones included) and a boolean mask, or None for plain causal."""
        B, T, d = x.shape
        if d != self.cfg.d_model:
            raise LorsaSurgeryError(f"Input has width {d} but this Lorsa module expects d_model={self.cfg.d_model}.")
        past = cache.seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        q, k, v = self.project(x, position_ids, rotary)
        if taps is not None:
            q, k, v = taps.qkv(q, k, v)
        if cache is not None:
            k, v = cache.update(k, v)
        mask = build_mask(attention_mask, B, T, k.shape[2], x.device)
        return q, k, v, mask

    def hidden_pre(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        taps: Taps | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Pre-activations z [B, T, n_ov]: each head's value, mixed by its QK head's attention; `taps` see and may
        replace what is computed on the way; `rotary` is the host's (cos, sin) (see `Rotary`)."""
        q, k, v, mask = self._attend_inputs(x, position_ids, attention_mask, cache, taps, rotary)
        wants_pattern = taps is not None and taps.wants_pattern
        if self.cfg.attn_logit_softcap is not None or wants_pattern:  # no fused kernel caps scores or hands out the pattern
            pattern = self._pattern(q, k, mask)
            z = (taps.pattern(pattern) if wants_pattern else pattern).to(v.dtype) @ v
            return z.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.cfg.n_ov_heads)
        scale = 1.0 / self.cfg.attn_scale
        if mask is None and GroupAttention.applies(q, k, v):
            z = GroupAttention.apply(q, k, v, scale)
        else:
            # Fused attention kernels want values as wide as queries; a group wider than that goes in slices, joined
            # already in [B, T, n_qk, group] order so that one copy both joins and transposes them.
            z = torch.cat([
                F.scaled_dot_product_attention(
                    q, k, part, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, scale=scale
                ).transpose(1, 2)
                for part in v.split(q.shape[-1], dim=-1)
            ], dim=-1)
        return z.reshape(x.shape[0], x.shape[1], self.cfg.n_ov_heads)

    def decoder_norm(self) -> torch.Tensor:
        """Norm of each head's output direction, [n_ov]."""
        return self._derived("decoder_norm", (self.W_O,), lambda: self.W_O.norm(dim=1))

    SCORE_BYTES = 1 << 23
    """Scores are ranked a block of tokens at a time through one buffer of about this size: a score as large as z would
    be a fresh allocation at every training step, whose first touch costs as much as the product."""

    def _topk(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [.., K] of the selected heads and their activations."""
        # ReLU keeps the order of what it does not zero, so ranking z itself picks heads of the same values.
        relu, k = self.cfg.topk_score == "relu", self.cfg.top_k
        if relu and not self.cfg.sparsity_include_decoder_norm:
            idx = z.topk(k, dim=-1, sorted=False).indices
        else:
            norm = self.decoder_norm() if self.cfg.sparsity_include_decoder_norm else None
            with torch.no_grad():
                flat = z.reshape(-1, z.shape[-1])
                rows = max(1, self.SCORE_BYTES // (flat.shape[-1] * flat.element_size()))
                score = flat.new_empty(min(rows, len(flat)), flat.shape[-1])
                blocks = []
                for block in flat.split(rows):
                    ranked = score[: len(block)]
                    source = block if relu else torch.abs(block, out=ranked)
                    if norm is not None:
                        torch.mul(source, norm, out=ranked)
                    blocks.append(ranked.topk(k, dim=-1, sorted=False).indices)
                idx = torch.cat(blocks).view(*z.shape[:-1], k)
        vals = Pick.apply(z, idx) if z.requires_grad and training_on_cpu(z) else z.gather(-1, idx)
        return idx, vals.relu() if relu else vals

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse head activations [B, T, n_ov] from pre-activations (zero where a head did not fire)."""
        if self.cfg.act_fn == "topk":
            idx, vals = self._topk(z)
            return torch.zeros_like(z).scatter(-1, idx, vals)
        if self.cfg.act_fn == "jumprelu":
            scaled = z * self.decoder_norm() if self.cfg.sparsity_include_decoder_norm else z
            return z * (scaled > self.log_jumprelu_threshold.exp())
        return z.relu()

    def encode(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Head activations [B, T, n_ov] for input x [B, T, d_model]."""
        return self.activate(self.hidden_pre(x, position_ids, attention_mask, cache, rotary=rotary))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Output [B, T, d_model] from head activations [B, T, n_ov]."""
        out = acts.to(self.W_O.dtype) @ self.W_O
        return out + self.b_D if self.b_D is not None else out

    def decode_sparse(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Output from the K selected heads only: gathers K rows of W_O, so cost does not grow with n_ov."""
        shape = idx.shape[:-1]
        out = F.embedding_bag(
            idx.reshape(-1, idx.shape[-1]), self.W_O, per_sample_weights=vals.reshape(-1, idx.shape[-1]).to(self.W_O.dtype),
            mode="sum",
        ).view(*shape, self.cfg.d_model)
        return out + self.b_D if self.b_D is not None else out

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Reconstruction [B, T, d_model] of the attention output.

        position_ids [B, T] are absolute (rotary works at any position); attention_mask is a [B, S] padding
        mask over all keys (cached ones included) or a 4-D boolean / additive mask; cache makes this an
        incremental step that appends this chunk's keys and values and attends over all of them; rotary is the
        host's (cos, sin) for these positions (see `Rotary`), needed for rotary types the module does not compute.
        """
        return self.reconstruct(self.hidden_pre(x, position_ids, attention_mask, cache, rotary=rotary))

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Output from pre-activations by the fastest route (gathering only the K selected heads for top-K)."""
        if self.cfg.act_fn == "topk":
            return self.decode_sparse(*self._topk(z))
        return self.decode(self.activate(z))

    # ---- analysis ----------------------------------------------------------------------------

    def attention_pattern(
        self, x: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Attention of every QK head, [B, n_qk, T, S]; materialised, so meant for analysis only."""
        q, k, _, mask = self._attend_inputs(x, position_ids, attention_mask, None, rotary=rotary)
        return self._pattern(q, k, mask)

    def _pattern(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) / self.cfg.attn_scale
        if self.cfg.attn_logit_softcap is not None:
            scores = torch.tanh(scores / self.cfg.attn_logit_softcap) * self.cfg.attn_logit_softcap
        if mask is None:
            mask = build_mask(None, q.shape[0], q.shape[2], k.shape[2], q.device, force=True)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)

    def z_pattern(
        self,
        x: torch.Tensor,
        heads: list[int] | torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Per-source contributions to each listed head's pre-activation, [B, len(heads), T, S].

        Summing over S gives hidden_pre for those heads: entry [b, i, t, s] is A[t, s] * v_head[s].
        """
        heads = torch.as_tensor(heads, dtype=torch.long, device=x.device)
        if heads.numel() and (heads.min() < 0 or heads.max() >= self.cfg.n_ov_heads):
            raise LorsaSurgeryError(f"Head index out of range 0..{self.cfg.n_ov_heads - 1}.")
        q, k, v, mask = self._attend_inputs(x, position_ids, attention_mask, None, rotary=rotary)
        pattern = self._pattern(q, k, mask)
        values = v.transpose(2, 3).reshape(x.shape[0], self.cfg.n_ov_heads, -1)[:, heads]  # [B, H, S]
        return pattern[:, heads // self.cfg.group_size] * values[:, :, None, :]

    # ---- construction and coordinates ----------------------------------------------------------

    @torch.no_grad()
    def in_input_space(self, space: Literal["hf", "processed"], gain: torch.Tensor, bias: torch.Tensor | None = None) -> "Lorsa":
        """A copy re-expressed for the other input space, where the HF input is h = gain * normalised + bias.

        processed -> hf folds 1/gain (and -bias/gain) into W_Q, W_K, W_V and their biases; hf -> processed
        is the inverse. Outputs and head activations are unchanged for corresponding inputs.
        """
        if space == self.cfg.input_space:
            return self
        import copy

        gain = gain.to(self.W_Q.device, torch.float32)
        bias = torch.zeros_like(gain) if bias is None else bias.to(gain)
        if space == "hf" and (gain == 0).any():
            raise LorsaSurgeryError("The input norm has a zero gain; a processed-space module cannot be mapped to it.")
        out = copy.deepcopy(self)
        out.cfg.input_space = space
        # to hf: n = (h - bias) / gain; to processed: h = gain * n + bias.
        scale, shift = (1.0 / gain, -bias / gain) if space == "hf" else (gain, bias)
        for W, b in ((out.W_Q, out.b_Q), (out.W_K, out.b_K)):
            b.add_(torch.einsum("d,hde->he", shift, W.float()).to(b.dtype))
            W.mul_(scale[None, :, None].to(W.dtype))
        out.b_V.add_((out.W_V.float() @ shift).to(out.b_V.dtype))
        out.W_V.mul_(scale[None, :].to(out.W_V.dtype))
        out._derived_cache = {}
        return out

    # ---- files ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, allow_pickle: bool = False, revision: str | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> "Lorsa":
        """Load a native, reference (llamascopium / lm-saes) or paper-era checkpoint onto `device` (default CPU)
        in `dtype` (default float32); the module is built without weights first, so they are never held twice.

        `path` is a folder, a Hub repo id, or `repo_id:subfolder`. Paper-era `final.pth` files are pickles
        and load only with `allow_pickle=True` (and then with `weights_only=True`).
        """
        return formats.load(path, cls._without_weights, allow_pickle=allow_pickle, revision=revision, device=device, dtype=dtype)

    @classmethod
    def _without_weights(cls, cfg: LorsaConfig) -> "Lorsa":
        """A module with no storage behind its parameters (meta device): loading gives it the checkpoint's tensors, so
        the weights are never held twice."""
        with torch.device("meta"):
            return cls(cfg)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the native format (lorsa_config.json, lorsa.safetensors, head_catalog.json) as a new folder, whole;
        an existing one is replaced only if this toolkit wrote it and `overwrite` is set."""
        with files.new_folder(path, overwrite=overwrite, kind=formats.NATIVE_FORMAT) as staging:
            formats.save_native(self, staging)
        return Path(path)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_model={c.d_model}, n_ov_heads={c.n_ov_heads}, n_qk_heads={c.n_qk_heads}x{c.d_qk_head}, "
            f"act_fn={c.act_fn}" + (f", top_k={c.top_k}" if c.act_fn == "topk" else "")
        )


def build_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, S: int, device: torch.device, force: bool = False
) -> torch.Tensor | None:
    """A boolean [B, 1, T, S] mask (True = attend) for T queries ending at key S-1, or None for plain causal.

    Accepts None, a [B, S] padding mask (1 = real token) or a 4-D boolean / additive float mask as produced
    by the attention implementations of transformers. Rows that would attend nowhere (queries at padding)
    attend everywhere instead, so they stay finite and never turn later layers into NaN.
    """
    if attention_mask is None and (T == S or T == 1) and not force:
        return None  # plain causal, or one query that may see every key
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    if attention_mask is None:
        mask = causal[None, None].expand(B, 1, T, S)
    elif attention_mask.dim() == 2:
        if attention_mask.shape != (B, S):
            raise LorsaSurgeryError(f"Padding mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}.")
        mask = causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    elif attention_mask.dim() == 4:
        mask = attention_mask.to(device)
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        if mask.shape[-2:] != (T, S):
            raise LorsaSurgeryError(f"Attention mask covers {tuple(mask.shape[-2:])} but there are {T} queries and {S} keys.")
        mask = mask[:, :1]
    else:
        raise LorsaSurgeryError(f"Attention mask must be 2-D or 4-D, got {attention_mask.dim()}-D.")
    return mask | ~mask.any(-1, keepdim=True)
