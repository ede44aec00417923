"""Looking at Lorsa heads: what makes them fire over a corpus, which source tokens feed them, what they write.

- `scan_heads`: firing statistics and top activations (with context windows) over token windows of a corpus,
- `z_pattern`: a head's pre-activation at one token split over the source tokens it attends to,
- `logit_attribution`: the tokens a head's output direction promotes and suppresses through the unembedding,
- a self-contained HTML dashboard per head, and PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jinja2 import Environment
from torch import nn
from tqdm.auto import tqdm

from lorsa_surgery import files
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.heads import HeadRef, HeadSpec, head_name, resolve_heads
from lorsa_surgery.interventions import Recorder, splice_of
from lorsa_surgery.patching import SweepResult, forward
from lorsa_surgery.splicing import HeadContext, Splice


def _one_head(head: HeadSpec, handle: Splice) -> HeadRef:
    refs = resolve_heads(head, handle)
    if len(refs) != 1:
        raise LorsaSurgeryError(f"{head!r} names {len(refs)} heads; name exactly one.")
    return refs[0]


def _pad_right(windows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token windows into ids [N, W] and a padding mask [N, W]."""
    W = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), W, dtype=torch.long)
    mask = torch.zeros(len(windows), W, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : len(w)], mask[i, : len(w)] = w, 1
    return ids, mask


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


@torch.no_grad()
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
    collect, per head, firing statistics and the k strongest activations with `context` = (before, after) tokens."""
    handle = splice_of(target)
    refs = resolve_heads(heads, handle)
    windows = [torch.as_tensor(w).reshape(-1) for w in windows]
    if not windows:
        raise LorsaSurgeryError("No token windows to scan.")
    h, W = len(refs), max(len(w) for w in windows)
    tokens, fired, total = 0, torch.zeros(h, dtype=torch.long), torch.zeros(h, dtype=torch.float64)
    peak = torch.full((h,), float("-inf"))
    top_vals, top_win, top_pos = torch.empty(0, h), torch.empty(0, h, dtype=torch.long), torch.empty(0, h, dtype=torch.long)
    top_rows = torch.empty(0, h, W)
    for start in tqdm(range(0, len(windows), batch_size), desc="scanning heads", disable=not progress):
        ids, mask = _pad_right(windows[start : start + batch_size])
        with Recorder(handle, refs) as rec:
            forward(handle, ids, mask)
        acts = rec.activations()  # [b, S, h]; S is the batch's longest window
        valid = mask.bool()[..., None]
        tokens += int(mask.sum())
        fired += ((acts != 0) & valid).sum((0, 1))
        total += (acts * valid).sum((0, 1)).double()
        masked = acts.masked_fill(~valid, float("-inf"))
        peak = torch.maximum(peak, masked.amax((0, 1)))
        if k:
            S = acts.shape[1]
            vals, flat = masked.reshape(-1, h).topk(min(k, masked.shape[0] * S), dim=0)  # [k', h]
            b, p = flat // S, flat % S
            rows = F.pad(acts.permute(2, 0, 1)[torch.arange(h)[None, :], b], (0, W - S))  # [k', h, W]
            top_vals = torch.cat([top_vals, vals])
            top_win, top_pos = torch.cat([top_win, b + start]), torch.cat([top_pos, p])
            top_rows = torch.cat([top_rows, rows])
            keep = top_vals.topk(min(k, len(top_vals)), dim=0).indices
            top_vals, top_win, top_pos = top_vals.gather(0, keep), top_win.gather(0, keep), top_pos.gather(0, keep)
            top_rows = top_rows[keep, torch.arange(h)[None, :]]
    before, after = context
    out = {}
    for j, ref in enumerate(refs):
        top = []
        for e in range(len(top_vals)):
            value = float(top_vals[e, j])
            if value == float("-inf") or value == 0:
                continue
            w, p = int(top_win[e, j]), int(top_pos[e, j])
            lo, hi = max(0, p - before), min(len(windows[w]), p + after + 1)
            top.append(TopActivation(value, w, p, windows[w][lo:hi].tolist(), top_rows[e, j, lo:hi].tolist(), p - lo))
        n_fired = int(fired[j])
        stats = FiringStats(
            tokens=tokens, fired=n_fired, mean=float(total[j]) / max(tokens, 1),
            mean_when_fired=float(total[j]) / max(n_fired, 1), max=float(peak[j]),
        )
        out[str(ref)] = HeadScan(str(ref), head_name(ref, handle), stats, top)
    return out


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
    cols = torch.as_tensor(position).expand(B) % T
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


@torch.no_grad()
def logit_attribution(target: Splice | nn.Module, head: HeadSpec, k: int = 10) -> LogitAttribution:
    """Direct logit attribution of a head's output direction W_O[head]: through the final norm's gain (centred
    first for LayerNorm) and the unembedding, ignoring the norm's data-dependent scale."""
    handle = splice_of(target)
    ref = _one_head(head, handle)
    model = handle.model
    norm = next((getattr(model.base_model, n) for n in _FINAL_NORMS if isinstance(getattr(model.base_model, n, None), nn.Module)), None)
    if norm is None:
        raise LorsaSurgeryError(f"Cannot find the final norm of {type(model).__name__} (looked for {', '.join(_FINAL_NORMS)}).")
    unembed = model.get_output_embeddings().weight
    direction = handle[ref.layer].lorsa.W_O[ref.index].float().to(unembed.device)
    if isinstance(norm, nn.LayerNorm):
        direction = direction - direction.mean()
    gain, _ = handle.arch.norm_gain(norm)
    scores = unembed.float() @ (direction * gain.to(direction.device))
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


_DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ name }} - lorsa-surgery</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:62em;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
.note{color:#555;margin-top:0} table.stats td{padding:2px 14px 2px 0}
.example{margin:.8em 0;padding:.6em .8em;border:1px solid #ddd;border-radius:6px}
.meta{font-size:.85em;color:#555;margin-bottom:.3em}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:2}
.tok{border-radius:3px} .focus{outline:2px solid #b00020}
.zp{margin-top:.5em;font-size:.85em} .zp-title{color:#555;margin-bottom:.2em}
.bar-row{display:flex;align-items:center;gap:.6em;height:1.3em}
.bar-label{width:14em;font-family:ui-monospace,monospace;white-space:pre;overflow:hidden;text-overflow:ellipsis}
.bar-track{width:20em} .bar{height:.75em;background:#e07b00;border-radius:2px} .bar.neg{background:#3b6fd8}
.dla{display:flex;gap:4em} .dla ol{font-family:ui-monospace,monospace;white-space:pre;padding-left:1.5em}
</style></head><body>
<h1>{{ name }}</h1>
{% if note %}<p class="note">{{ note }}</p>{% endif %}
<table class="stats">
<tr><td>tokens scanned</td><td id="tokens">{{ stats.tokens }}</td></tr>
<tr><td>fires on</td><td id="frequency">{{ "%.2f"|format(100 * stats.frequency) }}% of tokens</td></tr>
<tr><td>mean activation</td><td>{{ "%.4g"|format(stats.mean) }} (when firing {{ "%.4g"|format(stats.mean_when_fired) }})</td></tr>
<tr><td>max activation</td><td id="max">{{ "%.4g"|format(stats.max) }}</td></tr>
</table>
{% if attribution %}
<h2>Direct logit attribution (per unit of activation)</h2>
<div class="dla">
<div><b>promotes</b><ol class="promoted">{% for text, value in attribution.promoted %}<li>{{ text }}  {{ "%+.3f"|format(value) }}</li>{% endfor %}</ol></div>
<div><b>suppresses</b><ol class="suppressed">{% for text, value in attribution.suppressed %}<li>{{ text }}  {{ "%+.3f"|format(value) }}</li>{% endfor %}</ol></div>
</div>
{% endif %}
<h2>Top activations</h2>
{% if not examples %}<p>The head never fired on this corpus.</p>{% endif %}
{% for ex in examples %}
<div class="example" data-value="{{ ex.value }}">
<div class="meta">activation {{ "%.4g"|format(ex.value) }} at position {{ ex.position }} of window {{ ex.window }}</div>
<div class="tokens">{% for t in ex.tokens %}<span class="tok{% if t.focus %} focus{% endif %}" style="background:{{ t.color }}" title="{{ t.title }}" data-act="{{ t.act }}">{{ t.text }}</span>{% endfor %}</div>
{% if ex.bars %}<div class="zp"><div class="zp-title">z-pattern at the outlined token: the source tokens that feed it (z = {{ "%.4g"|format(ex.z) }})</div>
{% for bar in ex.bars %}<div class="bar-row"><span class="bar-label">{{ bar.label }}</span><span class="bar-track"><div class="bar{% if bar.value < 0 %} neg{% endif %}" style="width:{{ "%.1f"|format(bar.width) }}%" data-contribution="{{ bar.value }}"></div></span><span>{{ "%+.4g"|format(bar.value) }}</span></div>
{% endfor %}</div>{% endif %}
</div>
{% endfor %}
</body></html>
"""


def _color(act: float, scale: float) -> str:
    strength = min(abs(act) / scale, 1.0) if scale > 0 else 0.0
    rgb = "224,123,0" if act >= 0 else "59,111,216"
    return f"rgba({rgb},{strength:.3f})"


def render_dashboard(
    scan: HeadScan,
    tokenizer,
    zpatterns: ZPattern | None = None,
    attribution: LogitAttribution | None = None,
    note: str = "",
    n_bars: int = 8,
) -> str:
    """The HTML of a head's dashboard: statistics, logit attribution, and each top activation as coloured tokens with
    the z-pattern of its focus token (row i of `zpatterns` belongs to example i)."""
    scale = max((abs(a) for ex in scan.top for a in ex.acts), default=0.0)
    examples = []
    for i, ex in enumerate(scan.top):
        tokens = [
            {"text": token_text(tokenizer, t), "act": a, "color": _color(a, scale), "focus": j == ex.focus,
             "title": f"position {ex.position - ex.focus + j}: {a:.4g}"}
            for j, (t, a) in enumerate(zip(ex.tokens, ex.acts))
        ]
        bars, z = [], None
        if zpatterns is not None:
            parts = zpatterns.contributions[i]
            z = float(zpatterns.z[i])
            biggest = float(parts.abs().max()) or 1.0
            ids = zpatterns.input_ids[i]
            for s in parts.abs().argsort(descending=True)[:n_bars].tolist():
                value = float(parts[s])
                if value != 0:
                    label = f"{s:>4} {token_text(tokenizer, int(ids[s]))}"
                    bars.append({"label": label, "value": value, "width": 100 * abs(value) / biggest})
        examples.append({"value": ex.value, "position": ex.position, "window": ex.window, "tokens": tokens, "bars": bars, "z": z})
    dla = None
    if attribution is not None:
        dla = {
            "promoted": [(token_text(tokenizer, t), v) for t, v in attribution.promoted],
            "suppressed": [(token_text(tokenizer, t), v) for t, v in attribution.suppressed],
        }
    template = Environment(autoescape=True).from_string(_DASHBOARD)
    return template.render(name=scan.name, note=note, stats=scan.stats, attribution=dla, examples=examples)


def dashboard(
    target: Splice | nn.Module,
    tokenizer,
    head: HeadSpec,
    windows: Sequence[torch.Tensor],
    path: str | Path,
    *,
    k: int = 10,
    context: tuple[int, int] = (12, 4),
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Scan the windows for one head and write its self-contained HTML dashboard to `path`."""
    handle = splice_of(target)
    ref = _one_head(head, handle)
    scan = scan_heads(handle, windows, [ref], k=k, context=context, batch_size=batch_size, progress=progress)[str(ref)]
    zp = None
    if scan.top:
        ids, mask = _pad_right([torch.as_tensor(windows[ex.window]).reshape(-1) for ex in scan.top])
        zp = z_pattern(handle, ref, ids, [ex.position for ex in scan.top], mask)
    attribution = logit_attribution(handle, ref)
    note = handle[ref.layer].source.catalog.get(ref.index, {}).get("note", "")
    return files.write_text(path, render_dashboard(scan, tokenizer, zp, attribution, note))


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


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Heat map of a patching sweep: change of the metric from the baseline, heads down, positions across."""
    change = (result.values - result.baseline).numpy()
    limit = float(abs(change).max()) or 1.0
    fig, ax = _figure(max(5.0, 0.3 * len(result.positions) + 3), max(2.5, 0.25 * len(result.heads) + 1.5))
    image = ax.imshow(change, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(result.names)), result.names, fontsize=7)
    ax.set_xticks(range(len(result.positions)), result.positions, fontsize=7)
    ax.set(xlabel="position", title=f"{result.metric} - baseline {result.baseline:.3g}")
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
