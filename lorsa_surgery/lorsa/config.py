"""What a Lorsa module is, before any weights: its config, checked field by field, the limits on every number read
from a file or flag, and the rotary wavelengths a config implies."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from lorsa_surgery.errors import LorsaSurgeryError

if TYPE_CHECKING:
    import torch

OWN_ROPE_TYPES = ("default", "llama3")
"""Rotary types a Lorsa module computes itself (llama3 as NTK-by-parts); any other is taken from the host."""

MAX_INDEX = 2**31 - 1
"""The largest size, count or position read from a file or flag: no model comes near it, and torch indexes with it safely."""

MAX_CONTEXT = 2**20
"""The longest training sequence accepted (a million tokens); longer ones cannot be held for a batch anyway."""

MAX_MATRIX = 2**34
"""The most elements one weight matrix of a module may hold (64 GiB in float32, more than any accelerator has): a
larger one is a typo, refused before anything is allocated."""


def check_number(value: Any, name: str, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> Any:
    """`value` (as an int with `integer`, else a float) if it is a finite number, not a bool, with minimum <= value
    (minimum < value for `above`) and value <= maximum; otherwise one sentence naming `name`."""
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            value = int(value) if integer else float(value)
        except OverflowError:  # an integer too large to be a float
            ok = False
    ok = ok and (integer or math.isfinite(value)) and (minimum is None or value >= minimum) \
        and (above is None or value > above) and (maximum is None or value <= maximum)
    if ok:
        return value

    def show(bound: float) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    kind = "an integer" if integer else "a finite number"
    limited = f"{kind} of at most {show(maximum)}" if maximum is not None else kind
    if minimum is not None and maximum is not None:
        rule = f"be between {show(minimum)} and {show(maximum)} ({kind})"
    elif above == 0 or (integer and minimum == 1):
        rule = f"be positive ({limited})"
    elif minimum == 0:
        rule = f"not be negative ({limited})"
    elif above is not None:
        rule = f"be above {show(above)} ({limited})"
    elif minimum is not None:
        rule = f"be at least {show(minimum)} ({limited})"
    else:
        rule = f"be {limited}"
    raise LorsaSurgeryError(f"{name} must {rule}, got {value!r:.60}.")


def check_module_size(d_model: int, n_qk_heads: int, d_qk_head: int, n_ov_heads: int) -> None:
    """Refuse a module whose weight matrices would pass MAX_MATRIX, before anything is allocated."""
    largest = max(n_ov_heads, n_qk_heads * d_qk_head) * d_model
    if largest > MAX_MATRIX:
        raise LorsaSurgeryError(
            f"{n_ov_heads} heads ({n_qk_heads} query-key heads of width {d_qk_head}) on a width of {d_model} need a weight "
            f"matrix of {largest:.3g} elements, more than the {MAX_MATRIX:.3g} a Lorsa module may hold."
        )


@dataclass
class LorsaConfig:
    """Shape and behaviour of one Lorsa module, plus where it was trained."""

    d_model: int
    """Width of the residual stream the module reads and writes."""
    n_qk_heads: int
    """Number of query-key heads; each one is shared by a contiguous group of OV heads."""
    d_qk_head: int
    """Width of each query-key head."""
    n_ov_heads: int
    """Number of rank-1 OV heads (the dictionary size); a multiple of n_qk_heads."""
    act_fn: Literal["topk", "jumprelu", "relu"] = "topk"
    """Sparsity rule: K largest heads per token, a learned per-head threshold, or plain ReLU."""
    top_k: int = 64
    """Heads kept per token when act_fn is "topk"."""
    topk_score: Literal["relu", "abs"] = "relu"
    """How top-K ranks heads: relu(z) (current reference; activation relu(z)) or |z| (paper era; activation z)."""
    sparsity_include_decoder_norm: bool = True
    """Rank heads (and compare thresholds) by activation times the norm of the head's output direction."""
    use_decoder_bias: bool = True
    """Whether the output has a learned bias b_D."""
    attn_scale: float | None = None
    """Divisor of the query-key scores; None means sqrt(d_qk_head)."""
    attn_logit_softcap: float | None = None
    """Soft cap of the scaled query-key scores, cap * tanh(score / cap), as Gemma 2 applies; None means none."""
    positional_embedding_type: Literal["rotary", "none"] = "rotary"
    """Rotary embedding on queries and keys, or none (models with learned absolute positions)."""
    rotary_dim: int | None = None
    """Leading dimensions of each query-key head that rotate (partial rotary); None means all."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies."""
    rotary_adjacent_pairs: bool = False
    """True: GPT-J style pairs (0,1),(2,3)...; false: GPT-NeoX / Llama style halves."""
    use_NTK_by_parts_rope: bool = False
    """Llama-3.1 style NTK-by-parts frequency scaling."""
    NTK_by_parts_factor: float = 1.0
    """NTK-by-parts: overall scaling factor."""
    NTK_by_parts_low_freq_factor: float = 1.0
    """NTK-by-parts: low-frequency factor."""
    NTK_by_parts_high_freq_factor: float = 1.0
    """NTK-by-parts: high-frequency factor."""
    old_context_len: int = 2048
    """NTK-by-parts: the original context length."""
    rope_type: str = "default"
    """The host's rotary type, as transformers names it (default, linear, dynamic, yarn, longrope, llama3...). The
    module's own rotary computes the `OWN_ROPE_TYPES`; the others (with any attention scaling they fold into cos and
    sin) come from the host: the splice passes the cos and sin the host computes, and a run outside the host must
    pass them as `rotary=(cos, sin)`."""
    use_post_qk_ln: bool = False
    """Per-QK-head RMS norm of queries and keys before rotary (Qwen3 / Gemma3 style)."""
    qk_ln_eps: float = 1e-6
    """Epsilon of the query/key RMS norm."""
    qk_ln_full_width: bool = False
    """The query/key RMS norm takes all QK heads of a token together, as OLMo 2 normalises its whole projection
    before splitting heads, instead of each head alone."""
    n_ctx: int = 2048
    """Context length the module was trained with; longer inputs work, this is only a record."""
    input_space: Literal["hf", "processed"] = "hf"
    """Coordinates of the input: "hf" is what the HF attention module receives; "processed" is the bare
    normalised residual (TransformerLens processed weights: norm gain and bias folded away)."""
    host_model: str | None = None
    """Id or file name of the model this module was trained on."""
    host_revision: str | None = None
    """Revision (commit or sha256 of a local file) of the host model."""
    host_layer: int | None = None
    """Index of the attention layer this module replaces."""
    hook_point_in: str | None = None
    """TransformerLens-style name of the input site, e.g. blocks.3.ln1.hook_normalized."""
    hook_point_out: str | None = None
    """TransformerLens-style name of the output site, e.g. blocks.3.hook_attn_out."""

    def __post_init__(self) -> None:
        """Every field checked for type and range, so a module never runs on a config that gives wrong or NaN outputs."""
        for name in ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k", "old_context_len", "n_ctx"):
            setattr(self, name, check_number(getattr(self, name), name, integer=True, minimum=1, maximum=MAX_INDEX))
        for name, allowed in (("act_fn", ("topk", "jumprelu", "relu")), ("topk_score", ("relu", "abs")),
                              ("positional_embedding_type", ("rotary", "none")), ("input_space", ("hf", "processed"))):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise LorsaSurgeryError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {getattr(self, name)!r:.60}.")
        for name in ("sparsity_include_decoder_norm", "use_decoder_bias", "rotary_adjacent_pairs", "use_NTK_by_parts_rope",
                     "use_post_qk_ln", "qk_ln_full_width"):
            if not isinstance(getattr(self, name), bool):
                raise LorsaSurgeryError(f"{name} must be true or false, got {getattr(self, name)!r:.60}.")
        if not isinstance(self.rope_type, str) or not self.rope_type:
            raise LorsaSurgeryError(f"rope_type must be a non-empty string, got {self.rope_type!r:.60}.")
        for name in ("host_model", "host_revision", "hook_point_in", "hook_point_out"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise LorsaSurgeryError(f"{name} must be a string or null, got {getattr(self, name)!r:.60}.")
        if self.host_layer is not None:
            self.host_layer = check_number(self.host_layer, "host_layer", integer=True, minimum=0, maximum=MAX_INDEX)
        check_module_size(self.d_model, self.n_qk_heads, self.d_qk_head, self.n_ov_heads)
        if self.n_ov_heads % self.n_qk_heads:
            raise LorsaSurgeryError(
                f"n_ov_heads ({self.n_ov_heads}) must be divisible by n_qk_heads ({self.n_qk_heads})."
            )
        if self.act_fn == "topk" and self.top_k > self.n_ov_heads:
            raise LorsaSurgeryError(f"top_k ({self.top_k}) cannot exceed n_ov_heads ({self.n_ov_heads}).")
        self.rotary_dim = self.d_qk_head if self.rotary_dim is None else \
            check_number(self.rotary_dim, "rotary_dim", integer=True, minimum=1, maximum=self.d_qk_head)
        if self.rotary_dim % 2:
            raise LorsaSurgeryError(f"rotary_dim must be even, got {self.rotary_dim}.")
        # A zero or negative base, scale or factor gives NaN or silently wrong scores rather than an error.
        self.attn_scale = math.sqrt(self.d_qk_head) if self.attn_scale is None else \
            check_number(self.attn_scale, "attn_scale", above=0)
        if self.attn_logit_softcap is not None:
            self.attn_logit_softcap = check_number(self.attn_logit_softcap, "attn_logit_softcap", above=0)
        for name in ("rotary_base", "NTK_by_parts_factor", "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor"):
            setattr(self, name, check_number(getattr(self, name), name, above=0))
        self.qk_ln_eps = check_number(self.qk_ln_eps, "qk_ln_eps", minimum=0)

    @property
    def host_rotary(self) -> bool:
        """Whether queries and keys are rotated by the host's cos and sin: rotary types the module cannot compute
        itself. Hosts lay out what they pass in their own ways (GPT-J passes (sin, cos) per frequency pair), so the
        module's own rotary is used wherever it is exact."""
        return self.positional_embedding_type == "rotary" and self.rope_type not in OWN_ROPE_TYPES

    @property
    def group_size(self) -> int:
        """OV heads per query-key head."""
        return self.n_ov_heads // self.n_qk_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LorsaConfig":
        if not isinstance(d, dict):
            raise LorsaSurgeryError(f"The Lorsa config must be a JSON object, not {type(d).__name__}.")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise LorsaSurgeryError(f"Unknown Lorsa config field(s): {', '.join(unknown)}.")
        try:
            return cls(**d)
        except TypeError as e:  # a required field missing
            raise LorsaSurgeryError(f"Malformed Lorsa config: {e}.") from None


def rotary_inverse_wavelengths(cfg: LorsaConfig) -> torch.Tensor:
    """Per rotary pair, the angle step per position, with NTK-by-parts scaling when configured."""
    import torch  # here, so that configs and the limits on numbers read without torch (the CLI's --help)

    half = cfg.rotary_dim // 2
    # Same arithmetic as the reference (base ** (i / half)) so reference checkpoints match to round-off.
    freq = cfg.rotary_base ** (torch.arange(half, dtype=torch.float64) / half)
    if cfg.use_NTK_by_parts_rope:
        inv = 1.0 / freq
        factor, low, high = cfg.NTK_by_parts_factor, cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > cfg.old_context_len / low, inv / factor, inv)
        smooth = (cfg.old_context_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(inv)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= cfg.old_context_len / high) & (wavelen <= cfg.old_context_len / low)
        freq = 1.0 / torch.where(medium, smoothed, scaled)
    return (1.0 / freq).float()
