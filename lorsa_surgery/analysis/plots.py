"""PNG plots of z-patterns, patching sweeps and logit attributions."""

from __future__ import annotations

from pathlib import Path

from lorsa_surgery.analysis.attribution import LogitAttribution, ZPattern, token_text
from lorsa_surgery.interventions.patching import SweepResult
from lorsa_surgery.io import files


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
