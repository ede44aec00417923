"""Looking at Lorsa heads: what makes them fire over a corpus, which source tokens feed them, what they write.

- `scan_heads`: firing statistics and top activations (with context windows) over token windows of a corpus,
- `z_pattern`: a head's pre-activation at one token split over the source tokens it attends to,
- `logit_attribution`: the tokens a head's output direction promotes and suppresses through the unembedding,
- a self-contained HTML dashboard per head, and PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.interventions.heads import HeadRef, HeadSpec, head_name, resolve_heads
from lorsa_surgery.interventions.edits import splice_of
from lorsa_surgery.host.hooks import run_with_cache
from lorsa_surgery.host.splicing import Splice


def one_head(head: HeadSpec, handle: Splice) -> HeadRef:
    refs = resolve_heads(head, handle)
    if len(refs) != 1:
        raise LorsaSurgeryError(f"{head!r} names {len(refs)} heads; name exactly one.")
    return refs[0]


# ---- one token --------------------------------------------------------------------------------------------------


@dataclass
class ZPattern:
    """A head's pre-activation at one token of each row, split over the source tokens it attends to."""

    head: str
    """Head ref."""
    name: str
    """Display name."""
    input_ids: torch.Tensor
    """[B, T] the input."""
    positions: list[int]
    """Per row, the column of the token looked at."""
    contributions: torch.Tensor
    """[B, T] attention to each source token times that token's value for the head; sums to `z`."""
    z: torch.Tensor
    """[B] the pre-activation."""
    activation: torch.Tensor
    """[B] the activation after the sparsity rule (zero if the head did not fire)."""


@torch.no_grad()
def z_pattern(
    target: Splice | nn.Module,
    head: HeadSpec,
    input_ids: torch.Tensor,
    position: int | Sequence[int] = -1,
    attention_mask: torch.Tensor | None = None,
) -> ZPattern:
    """Which source tokens feed `head` at column `position` (one for all rows, or one per row; negative counts from
    the end), and how much. Runs the model once; active interventions shape the run."""
    handle = splice_of(target)
    ref = one_head(head, handle)
    site = handle[ref.layer]
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    B, T = input_ids.shape
    cols = torch.as_tensor(position).expand(B)
    if ((cols < -T) | (cols >= T)).any():
        bad = int(cols[(cols < -T) | (cols >= T)][0])
        raise LorsaSurgeryError(f"Position {bad} is out of range: the input has {T} tokens (positions 0..{T - 1}, or -{T}..-1).")
    cols = cols % T
    names = [f"L{ref.layer}.hook_pattern", f"L{ref.layer}.hook_v", f"L{ref.layer}.hook_acts"]
    cache = run_with_cache(handle, input_ids, names, attention_mask=attention_mask, stop=True)
    pattern, values, acts = (cache[name] for name in names)
    rows, at = torch.arange(B, device=acts.device), cols.to(acts.device)
    # Entry s of the row: the attention from the token looked at to source s, times the head's value at s.
    parts = pattern[rows, ref.index // site.lorsa.cfg.group_size, at] * values[..., ref.index]
    contributions = parts.float().cpu()
    return ZPattern(
        str(ref), head_name(ref, handle), input_ids, cols.tolist(), contributions, contributions.sum(-1),
        acts[rows, at, ref.index].float().cpu(),
    )


# ---- the output side --------------------------------------------------------------------------------------------


@dataclass
class LogitAttribution:
    """The tokens a head's output direction pushes up and down, per unit of activation."""

    head: str
    """Head ref."""
    name: str
    """Display name."""
    promoted: list[tuple[int, float]]
    """(token id, logit change) of the most promoted tokens, strongest first."""
    suppressed: list[tuple[int, float]]
    """(token id, logit change) of the most suppressed tokens, strongest first."""


_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm")


def unembedding(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """directions [..., d] -> direct logit effects [..., vocab]: through the final norm's gain (centred first for a
    LayerNorm) and the unembedding, ignoring the norm's data-dependent scale."""
    base = getattr(model, "base_model", model)
    norm = next((getattr(base, n) for n in _FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    if norm is None:
        raise LorsaSurgeryError(f"Cannot find the final norm of {type(model).__name__} (looked for {', '.join(_FINAL_NORMS)}).")
    weight = model.get_output_embeddings().weight
    gain, _ = arch_for(model).norm_gain(norm)
    centre = isinstance(norm, nn.LayerNorm)

    def logits(directions: torch.Tensor) -> torch.Tensor:
        directions = directions.float().to(weight.device)
        if centre:
            directions = directions - directions.mean(-1, keepdim=True)
        return (directions * gain.to(directions.device)) @ weight.float().T

    return logits


@torch.no_grad()
def logit_scores(target: Splice | nn.Module, layer: int, heads: Sequence[int]) -> torch.Tensor:
    """[len(heads), vocab] direct logit attribution of each head's output direction W_O[head] (`unembedding`)."""
    handle = splice_of(target)
    return unembedding(handle.model)(handle[layer].lorsa.W_O[torch.as_tensor(list(heads), dtype=torch.long)])


def logit_attribution(target: Splice | nn.Module, head: HeadSpec, k: int = 10) -> LogitAttribution:
    """The k tokens a head's output direction promotes and suppresses most (`logit_scores`)."""
    handle = splice_of(target)
    ref = one_head(head, handle)
    scores = logit_scores(handle, ref.layer, [ref.index])[0]
    up, down = scores.topk(k), (-scores).topk(k)
    return LogitAttribution(
        str(ref), head_name(ref, handle),
        [(int(i), float(v)) for v, i in zip(up.values, up.indices)],
        [(int(i), -float(v)) for v, i in zip(down.values, down.indices)],
    )


# ---- dashboard ---------------------------------------------------------------------------------------------------


def token_text(tokenizer, token: int) -> str:
    """A token as it reads in text, with newlines and tabs made visible."""
    text = tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5")
