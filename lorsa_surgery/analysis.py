"""Looking at Lorsa heads: what makes them fire over a corpus, which source tokens feed them, what they write.

- `scan_heads`: firing statistics and top activations (with context windows) over token windows of a corpus,
- `z_pattern`: a head's pre-activation at one token split over the source tokens it attends to,
- `logit_attribution`: the tokens a head's output direction promotes and suppresses through the unembedding,
- a self-contained HTML dashboard per head, and PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lorsa_surgery import files
from lorsa_surgery.arch import arch_for
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.heads import HeadRef, HeadSpec, head_name, resolve_heads
from lorsa_surgery.interventions import splice_of
from lorsa_surgery.patching import SweepResult, forward
from lorsa_surgery.splicing import HeadContext, Splice


def _one_head(head: HeadSpec, handle: Splice) -> HeadRef:
    refs = resolve_heads(head, handle)
    if len(refs) != 1:
        raise LorsaSurgeryError(f"{head!r} names {len(refs)} heads; name exactly one.")
    return refs[0]


# ---- corpus scans -----------------------------------------------------------------------------------------------


@dataclass
class FiringStats:
    """How often and how strongly a head fires over a corpus."""

    tokens: int
    """Tokens scanned."""
    fired: int
    """Tokens at which the head's activation was non-zero."""
    mean: float
    """Mean activation over all tokens, zeros included (what mean ablation writes)."""
    mean_when_fired: float
    """Mean activation over the tokens at which it fired."""
    max: float
    """Largest activation."""

    @property
    def frequency(self) -> float:
        return self.fired / max(self.tokens, 1)


@dataclass
class TopActivation:
    """One of a head's strongest activations, with the tokens around it."""

    value: float
    """The activation."""
    window: int
    """Index of the corpus window it occurred in."""
    position: int
    """Position of the token in that window."""
    tokens: list[int]
    """Token ids of the context (before and after the token)."""
    acts: list[float]
    """The head's activation at each context token."""
    focus: int
    """Index in `tokens` of the token itself."""


@dataclass
class HeadScan:
    """A head's firing statistics and top activations over a corpus."""

    head: str
    """Head ref (`L3.H5`)."""
    name: str
    """Display name, with the catalog label if any."""
    stats: FiringStats
    """How often and how strongly it fires."""
    top: list[TopActivation]
    """Its strongest activations, strongest first."""


def scan_heads(
    target: Splice | nn.Module,
    windows: Sequence[torch.Tensor],
    heads: HeadSpec,
    *,
    k: int = 10,
    context: tuple[int, int] = (12, 4),
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, HeadScan]:
    """Run token windows (1-D or [1, T] tensors, e.g. from `lorsa_surgery.metrics.token_windows`) through the model and
    collect, per head, firing statistics and the k strongest activations with `context` = (before, after) tokens
    (`lorsa_surgery.scan.scan`, one scan per layer; its store holds more: see `heads scan`)."""
    from lorsa_surgery.heads import by_layer
    from lorsa_surgery.scan import scan

    handle = splice_of(target)
    refs = resolve_heads(heads, handle)
    windows = [(i, 0, torch.as_tensor(w).reshape(-1)) for i, w in enumerate(windows)]
    before, after = context
    out = {}
    for layer, indices in by_layer(refs).items():
        store = scan(handle, windows, layer, indices, k=k, bands=0, per_band=0, n_logits=1, batch_size=batch_size,
                     progress=progress)
        rows = store.rows()
        for column, row in enumerate(rows):
            acts = store.activations_at(column)
            top = []
            for ex in store.examples(column):
                ids = store.window(ex["window"]).tolist()
                lo, hi = max(0, ex["position"] - before), min(len(ids), ex["position"] + after + 1)
                top.append(TopActivation(ex["value"], ex["window"], ex["position"], ids[lo:hi],
                                         [acts.get((ex["window"], t), 0.0) for t in range(lo, hi)], ex["position"] - lo))
            stats = FiringStats(tokens=store.n_tokens, fired=row["fired"], mean=row["mean"], mean_when_fired=row["mean_when_fired"],
                                max=row["max"])
            out[row["head"]] = HeadScan(row["head"], row["name"], stats, top)
    return {str(ref): out[str(ref)] for ref in refs}


def mean_activations(
    target: Splice | nn.Module, windows: Sequence[torch.Tensor], heads: HeadSpec, *, batch_size: int = 8, progress: bool = True
) -> dict[str, float]:
    """Each head's mean activation over the windows (zeros included), keyed by head ref: the `means` of
    `Ablate(how="mean")`."""
    scans = scan_heads(target, windows, heads, k=0, batch_size=batch_size, progress=progress)
    return {ref: scan.stats.mean for ref, scan in scans.items()}


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
    ref = _one_head(head, handle)
    site = handle[ref.layer]
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    B, T = input_ids.shape
    cols = torch.as_tensor(position).expand(B)
    if ((cols < -T) | (cols >= T)).any():
        bad = int(cols[(cols < -T) | (cols >= T)][0])
        raise LorsaSurgeryError(f"Position {bad} is out of range: the input has {T} tokens (positions 0..{T - 1}, or -{T}..-1).")
    cols = cols % T
    seen: dict[str, Any] = {}

    def grab_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def grab_context(acts: torch.Tensor, ctx: HeadContext) -> None:
        seen["ctx"], seen["act"] = ctx, acts[..., ref.index].clone()

    remover = site.register_forward_pre_hook(grab_input, with_kwargs=True)
    site.hooks.append(grab_context)
    try:
        forward(handle, input_ids, attention_mask)
    finally:
        remover.remove()
        site.hooks.remove(grab_context)
    ctx = seen["ctx"]
    parts = site.lorsa.z_pattern(seen["x"], [ref.index], ctx.position_ids, ctx.attention_mask)[:, 0]  # [B, T, S]
    rows = torch.arange(B)
    contributions = parts[rows, cols.to(parts.device)].float().cpu()
    return ZPattern(
        str(ref), head_name(ref, handle), input_ids, cols.tolist(), contributions, contributions.sum(-1),
        seen["act"][rows, cols.to(seen["act"].device)].float().cpu(),
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
    ref = _one_head(head, handle)
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


def dashboard(
    target: Splice | nn.Module,
    tokenizer,
    head: HeadSpec,
    windows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    k: int = 10,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Scan the windows for one head and write its self-contained HTML page to `path` (`lorsa_surgery.pages`); to
    look at many heads, scan once with `heads scan` instead."""
    from lorsa_surgery.pages import head_page
    from lorsa_surgery.scan import scan

    handle = splice_of(target)
    ref = _one_head(head, handle)
    windows = [(i, 0, torch.as_tensor(w).reshape(-1)) for i, w in enumerate(windows)]
    store = scan(handle, windows, ref.layer, [ref.index], k=k, batch_size=batch_size, progress=progress)
    return files.write_text(path, head_page(store, tokenizer, 0, index_href="index.html"))


# ---- plots ----------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # A bare Figure renders with Agg on savefig and leaves the user's pyplot backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_z_pattern(zp: ZPattern, tokenizer, path: str | Path, row: int = 0) -> Path:
    """Bars of each source token's contribution to the head's pre-activation at the token looked at."""
    parts = zp.contributions[row]
    S = zp.positions[row] + 1  # causal: later tokens contribute nothing
    fig, ax = _figure(max(6.0, 0.22 * S + 1.5), 3.6)
    ax.bar(range(S), parts[:S].tolist(), color=["#e07b00" if v >= 0 else "#3b6fd8" for v in parts[:S].tolist()])
    step = max(1, S // 48)
    ax.set_xticks(range(0, S, step), [token_text(tokenizer, int(t)) for t in zp.input_ids[row, :S:step]], rotation=90, fontsize=7)
    ax.set(ylabel="contribution to z", title=f"{zp.name} at position {zp.positions[row]}: z = {float(zp.z[row]):.3g}")
    fig.tight_layout()
    return files.write_figure(path, fig)


def sweep_changes(result: SweepResult, noise: float = 1e-5):
    """[heads, positions] change of the metric from the baseline, as a numpy array, with changes smaller than
    `noise` x max(1, |baseline|) (float round-off of an edit that changes nothing) set to zero."""
    change = (result.values - result.baseline).numpy()
    change[abs(change) < noise * max(1.0, abs(result.baseline))] = 0.0
    return change


def plot_sweep(result: SweepResult, path: str | Path, position_labels: list[str] | None = None) -> Path:
    """Heat map of a patching sweep: change of the metric from the baseline, heads down, positions across, on a scale
    symmetric about zero. Changes within float noise of the baseline are drawn as zero, so a sweep that changes
    nothing looks blank instead of stretching round-off across the colour scale."""
    change = sweep_changes(result)
    limit = float(abs(change).max()) or 1.0
    fig, ax = _figure(max(5.0, 0.3 * len(result.positions) + 3), max(2.5, 0.25 * len(result.heads) + 1.5))
    image = ax.imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(result.names)), result.names, fontsize=7)
    labels = [f"{p} {t!r}" for p, t in zip(result.positions, position_labels)] if position_labels else result.positions
    ax.set_xticks(range(len(result.positions)), labels, fontsize=7, rotation=90 if position_labels else 0)
    ax.set(xlabel="position", title=f"{result.metric} - baseline {result.baseline:.3g}" + ("" if change.any() else " (no change)"))
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return files.write_figure(path, fig)


def plot_logit_attribution(attribution: LogitAttribution, tokenizer, path: str | Path) -> Path:
    """Horizontal bars of the most promoted and most suppressed tokens."""
    entries = attribution.promoted + attribution.suppressed[::-1]
    fig, ax = _figure(5.5, 0.25 * len(entries) + 1.2)
    ax.barh(range(len(entries))[::-1], [v for _, v in entries], color=["#e07b00" if v >= 0 else "#3b6fd8" for _, v in entries])
    ax.set_yticks(range(len(entries))[::-1], [repr(token_text(tokenizer, t)) for t, _ in entries], fontsize=7)
    ax.set(xlabel="logit change per unit activation", title=f"{attribution.name}: direct logit attribution")
    fig.tight_layout()
    return files.write_figure(path, fig)
