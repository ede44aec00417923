"""Circuits through Lorsa heads: node and Q/K/V edge attribution, a pruned graph, and its verification.

- `attribute`: for a prompt and a metric, (clean activation - baseline activation) x d metric / d activation for every
  head at every position of every spliced layer, from one forward and backward pass (plus one forward for the
  baseline). The baseline is a corrupted prompt, each head's mean, or zero. On a layer spliced with an exact copy of its
  attention (`exact_copy`) the nodes are its MHSA heads (`L3.A2`): the sum over the head's rank-1 parts.
- `attribute_edges`: for chosen downstream nodes, the share of each one's attribution that each upstream head's output
  carries through the node's query (at its own position), keys and values (at every source position), separately.
  The downstream layer's input is taken three times, once per read; the node's metric-weighted pre-activation is
  differentiated against each copy, and the gradient is carried back to the residual stream through the layer's input
  norm, linearised at the clean point (`mlps="direct"`: MLPs and unspliced attention do not carry anything), or back to
  every upstream spliced layer's output through the whole model with spliced attention frozen (`mlps="linearised"`: MLPs
  and unspliced attention carry their Jacobian at the clean point).
- `prune`: the fewest nodes and edges carrying a chosen share of the attribution, as a `Graph` (JSON in and out).
- `faithfulness` and `necessity`: keep only the circuit's heads (mean-ablating every other head of the spliced layers),
  or ablate the circuit against as many other heads that fire as often, with bootstrap intervals over prompts.
- `patch_heads` and `path_patch`: what the attribution estimates, measured: the metric moved by patching a head from the
  baseline at every position, or by taking one upstream output out of one downstream read only; `spearman` to
  compare the two rankings.

The page of a graph is drawn by `lorsa_surgery.analysis.circuit_page`.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from lorsa_surgery.analysis.attribution import logit_scores, token_text
from lorsa_surgery.analysis.causal import Estimate
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.hooks import add_hooks, hooks, model_inputs, run_with_cache, watch_attention
from lorsa_surgery.host.splicing import Splice
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, splice_of
from lorsa_surgery.interventions.heads import HeadRef, HeadSpec, is_exact_copy, resolve_heads
from lorsa_surgery.interventions.patching import Metric, forward
from lorsa_surgery.io import files
from lorsa_surgery.lorsa.model import build_mask

Baseline = Literal["corrupt", "mean", "zero"]
Mlps = Literal["direct", "linearised"]
KINDS = ("q", "k", "v")
"""Edge kinds: what of the downstream head the upstream output reaches, its query, its keys or its values."""
GRAPH_FORMAT = "lorsa-surgery.circuit"


# ---- nodes ------------------------------------------------------------------------------------------------------


def _unit_width(handle: Splice, layer: int) -> tuple[int, str]:
    """(rank-1 heads per node, name letter): an exact copy's nodes are its MHSA heads (`L3.A2`), a QK group each."""
    if is_exact_copy(handle, layer):
        return handle[layer].lorsa.cfg.group_size, "A"
    return 1, "H"


def _by_unit(x: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n_ov] per rank-1 head -> [..., n_ov / width] per node (summed)."""
    return x if width == 1 else x.unflatten(-1, (-1, width)).sum(-1)


@dataclass
class _Run:
    """What the clean run left for edge attribution, per spliced layer."""

    handle: Splice
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    grads: dict[int, torch.Tensor]
    """d metric / d activation [B, T, n_ov]."""
    clean: dict[int, torch.Tensor]
    """Clean activations [B, T, n_ov]."""
    delta: dict[int, torch.Tensor]
    """Clean minus baseline activations [B, T, n_ov]."""
    inputs: dict[int, torch.Tensor]
    """The attention input [B, T, d] (what `hook_in` sees)."""
    kwargs: dict[int, dict[str, Any]]
    """What the host passed to the attention (positions, mask, rotary)."""
    residual: dict[int, torch.Tensor]
    """The decoder layer's input [B, T, d], the residual stream before its input norm."""


@dataclass
class NodeAttribution:
    """(clean - baseline activation) x gradient of the metric for every node (head or MHSA head) at every position,
    averaged over the rows of the input: to first order, how much of the metric each node's clean activation accounts
    for against the baseline."""

    metric: str
    """What was measured."""
    baseline: str
    """corrupt, mean or zero."""
    values: dict[int, torch.Tensor]
    """Per spliced layer, [nodes, T]."""
    names: dict[int, list[str]]
    """Per spliced layer, the node names (`L3.H12`, or `L3.A2` on an exact copy)."""
    widths: dict[int, int]
    """Per spliced layer, rank-1 heads per node (1, or an exact copy's group size)."""
    input_ids: torch.Tensor
    """[B, T] the clean input."""
    clean_metric: float
    """The metric of the clean run (mean over rows)."""
    baseline_metric: float
    """The metric of the baseline run: the corrupted prompt, or every head of the spliced layers at its mean or zero."""
    run: _Run = field(repr=False)

    def node(self, key: str) -> tuple[int, int, int]:
        """`L3.H12@5` -> (layer, node index, position)."""
        name, _, position = key.partition("@")
        layer = int(name[1:].partition(".")[0])
        if layer not in self.names or name not in self.names[layer] or not position.isdecimal():
            raise LorsaSurgeryError(f"{key!r} is no node of this attribution: write a node name and a position, L3.H12@5.")
        if int(position) >= self.input_ids.shape[1]:
            raise LorsaSurgeryError(f"{key!r}: the input has {self.input_ids.shape[1]} positions.")
        return layer, self.names[layer].index(name), int(position)

    def top(self, n: int | None = None, layers: Sequence[int] | None = None) -> list[tuple[str, float]]:
        """The n (node id `L3.H12@5`, attribution) of largest |attribution| (all non-zero ones for None), largest first."""
        out = []
        for layer, values in self.values.items():
            if layers is not None and layer not in layers:
                continue
            for unit, position in values.nonzero().tolist():
                out.append((f"{self.names[layer][unit]}@{position}", float(values[unit, position])))
        out.sort(key=lambda item: -abs(item[1]))
        return out if n is None else out[:n]

    def top_heads(self, n: int | None = None) -> list[tuple[str, float]]:
        """The n (node name `L3.H12`, attribution summed over positions) of largest |sum| (all non-zero ones for None),
        largest first: to first order, the metric lost by patching the head from the baseline at every position
        (`patch_heads`)."""
        out = [(self.names[layer][unit], float(total)) for layer, values in self.values.items()
               for unit, total in enumerate(values.sum(-1).tolist()) if total != 0]
        out.sort(key=lambda item: -abs(item[1]))
        return out if n is None else out[:n]

    def total(self) -> float:
        """Sum of every node's attribution: to first order, clean minus baseline metric as far as heads carry it."""
        return float(sum(v.sum() for v in self.values.values()))


def _check_input(input_ids: torch.Tensor) -> torch.Tensor:
    input_ids = torch.as_tensor(input_ids)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise LorsaSurgeryError("The input must be token ids [T] or [B, T] with at least one token.")
    return input_ids


def attribute(
    target: Splice | torch.nn.Module,
    input_ids: torch.Tensor,
    metric: Metric,
    corrupt_ids: torch.Tensor | None = None,
    baseline: Baseline | None = None,
    *,
    means: dict[int, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> NodeAttribution:
    """Attribution of every node of every spliced layer at every position (`NodeAttribution`).

    `baseline` (default: corrupt with `corrupt_ids`, else mean): corrupt takes each head's activation in a run on
    `corrupt_ids` (the same shape as `input_ids`); mean takes `means` ({layer: [n_ov]}, default each head's mean over the
    tokens of `input_ids`, zeros included); zero takes zero. `metric(logits, ids, mask)` gives one number per row
    (`LogitDiff`, `Probability(log=True)`, `Loss`...); the gradient is that of their sum.
    """
    handle = splice_of(target)
    input_ids = _check_input(input_ids)
    baseline = baseline or ("corrupt" if corrupt_ids is not None else "mean")
    if baseline not in ("corrupt", "mean", "zero"):
        raise LorsaSurgeryError(f"The baseline must be corrupt, mean or zero, got {baseline!r}.")
    if (baseline == "corrupt") != (corrupt_ids is not None):
        raise LorsaSurgeryError("A corrupt baseline needs corrupt_ids, and only it takes them.")
    if corrupt_ids is not None:
        corrupt_ids = _check_input(corrupt_ids)
        if corrupt_ids.shape != input_ids.shape:
            raise LorsaSurgeryError(f"The corrupted input has shape {tuple(corrupt_ids.shape)}, the clean one "
                                    f"{tuple(input_ids.shape)}: they must be as long, token for token.")
    layers = handle.layers
    widths = {layer: _unit_width(handle, layer) for layer in layers}
    model = handle.model
    blocks = handle.arch.layer_list(model)
    residual: dict[int, torch.Tensor] = {}

    def keep_residual(layer: int):
        def hook(module, args, kwargs):
            residual[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    keeping = [blocks[layer].register_forward_pre_hook(keep_residual(layer), with_kwargs=True) for layer in layers]
    try:
        with watch_attention(model, layers) as calls:
            cache = run_with_cache(handle, input_ids, ["hook_acts"], grad=True, attention_mask=attention_mask)
    finally:
        for hook in keeping:
            hook.remove()
    acts = [cache[f"L{layer}.hook_acts"] for layer in layers]
    scores = metric(cache.logits, input_ids.to(cache.logits.device), attention_mask)
    grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
    clean = {layer: a.detach().float() for layer, a in zip(layers, acts)}
    grads = {layer: torch.zeros_like(clean[layer]) if g is None else g.float() for layer, g in zip(layers, grads)}

    with torch.no_grad():
        if baseline == "corrupt":
            base_cache = run_with_cache(handle, corrupt_ids, ["hook_acts"], attention_mask=attention_mask)
            base = {layer: base_cache[f"L{layer}.hook_acts"].float() for layer in layers}
            baseline_metric = float(metric(base_cache.logits, corrupt_ids.to(base_cache.logits.device), attention_mask).mean())
        else:
            if baseline == "zero":
                per_head = {layer: torch.zeros(clean[layer].shape[-1]) for layer in layers}
            elif means is not None:
                per_head = {layer: torch.as_tensor(means[layer]).float() for layer in layers}
            else:
                per_head = {layer: _token_mean(clean[layer], attention_mask) for layer in layers}
            base = {layer: per_head[layer].to(clean[layer].device).expand_as(clean[layer]) for layer in layers}
            with _ablated(handle, {layer: per_head[layer] for layer in layers}):
                baseline_metric = float(metric(forward(handle, input_ids, attention_mask), input_ids, attention_mask).mean())
    delta = {layer: clean[layer] - base[layer] for layer in layers}
    values = {layer: _by_unit(delta[layer] * grads[layer], widths[layer][0]).mean(0).T.cpu() for layer in layers}
    names = {layer: [f"L{layer}.{letter}{u}" for u in range(values[layer].shape[0])] for layer, (_, letter) in widths.items()}
    run = _Run(handle, input_ids, attention_mask, grads, clean, delta,
               {layer: calls[layer].hidden_states.detach() for layer in layers},
               {layer: {k: v for k, v in calls[layer].kwargs.items() if k != "hidden_states"} for layer in layers}, residual)
    return NodeAttribution(
        metric=getattr(metric, "name", type(metric).__name__), baseline=baseline, values=values, names=names,
        widths={layer: w for layer, (w, _) in widths.items()}, input_ids=input_ids.cpu(),
        clean_metric=float(scores.detach().mean()), baseline_metric=baseline_metric, run=run,
    )


def _token_mean(acts: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each head's mean activation [n_ov] over the real tokens of a run's activations [B, T, n_ov]."""
    if attention_mask is None:
        return acts.flatten(0, 1).mean(0).cpu()
    return acts[attention_mask.bool().to(acts.device)].mean(0).cpu()


def _ablated(handle: Splice, values: dict[int, torch.Tensor], keep: set[HeadRef] = frozenset()):
    """Every head of the given layers, except those kept, set to its value (its mean, or zero), as an `Ablate`."""
    refs = [HeadRef(layer, h) for layer, v in values.items() for h in range(len(v)) if HeadRef(layer, h) not in keep]
    if not refs:
        return InterventionSet().applied(handle)
    means = {str(r): float(values[r.layer][r.index]) for r in refs}
    return InterventionSet([Ablate(refs, how="mean", means=means)]).applied(handle)


# ---- edges ------------------------------------------------------------------------------------------------------


@dataclass
class EdgeAttribution:
    """Edges from upstream nodes into chosen downstream nodes, by kind (q, k, v), in units of the metric, averaged over
    the rows of the input. Entry i: from node `source_names[i]`@`source_position[i]` into `targets[target[i]]`."""

    targets: list[str]
    """The downstream nodes (`L3.H12@5`)."""
    mlps: str
    """direct or linearised (see the module's docstring)."""
    names: dict[int, list[str]]
    """Per spliced layer, the node names (as in `NodeAttribution.names`)."""
    target: torch.Tensor
    """[E] index into targets."""
    kind: torch.Tensor
    """[E] 0, 1, 2: q, k, v."""
    source_layer: torch.Tensor
    """[E] upstream layer."""
    source_unit: torch.Tensor
    """[E] upstream node index in its layer."""
    source_position: torch.Tensor
    """[E] upstream position."""
    weight: torch.Tensor
    """[E] the edge's attribution."""

    def records(self) -> list[tuple[str, str, str, float]]:
        """(source node id, target node id, kind, weight) of every edge."""
        columns = (self.source_layer, self.source_unit, self.source_position, self.target, self.kind, self.weight)
        return [(f"{self.names[m][u]}@{p}", self.targets[t], KINDS[k], w) for m, u, p, t, k, w in zip(*(c.tolist() for c in columns))]

    def weights(self) -> dict[tuple[str, str, str], float]:
        """{(source id, target id, kind): weight}."""
        return {(s, t, k): w for s, t, k, w in self.records()}


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Rows of a per-row tensor, or the tensor itself where it has one row for all (it broadcasts)."""
    if t is None or t.shape[0] == 1:
        return t
    return t[rows.to(t.device)]


def _node_pre(site, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kwargs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """Pre-activations [N, T, n_ov] of a spliced layer's module with queries, keys and values read from three separate
    copies of its input [N, T, d], for the given rows of the clean run."""
    lorsa = site.lorsa
    xq, xk, xv = inputs
    N, T, _ = xq.shape
    positions = kwargs.get("position_ids")
    positions = torch.arange(T, device=xq.device).expand(N, T) if positions is None else _rows(positions, rows)
    rotary = kwargs.get("position_embeddings") if lorsa.cfg.host_rotary else None  # as when spliced
    if rotary is not None:
        rotary = tuple(_rows(part, rows) for part in rotary)
    q = lorsa.project(xq, positions, rotary)[0]
    k = lorsa.project(xk, positions, rotary)[1]
    v = lorsa.project(xv, positions, rotary)[2]
    mask = _rows(kwargs.get("attention_mask"), rows)
    mask = build_mask(mask, N, T, T, xq.device, force=True)
    pattern = lorsa._pattern(q, k, mask.expand(N, *mask.shape[1:]))
    return (pattern.to(v.dtype) @ v).transpose(1, 2).reshape(N, T, lorsa.cfg.n_ov_heads)


def _input_gradients(run: _Run, layer: int, unit: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                     width: int) -> list[torch.Tensor]:
    """For each (node, row): d(metric-weighted pre-activation of the node's fired heads at its position) / d(each of
    the three copies of the layer's input), [N, T, d] per kind."""
    site = run.handle[layer]
    x = run.inputs[layer][rows.to(run.inputs[layer].device)]
    copies = [x.clone().float().requires_grad_() for _ in KINDS]
    dtype = site.lorsa.W_Q.dtype
    with torch.enable_grad():
        z = _node_pre(site, [c.to(dtype) for c in copies], run.kwargs[layer], rows)
        N = len(rows)
        at = z[torch.arange(N), positions.to(z.device)]  # [N, n_ov]
        grads, fired = run.grads[layer][rows, positions], run.clean[layer][rows, positions] != 0
        weight = torch.where(fired, grads, torch.zeros_like(grads))
        owner = torch.arange(at.shape[-1], device=at.device) // width
        weight = weight * (owner[None] == unit[:, None].to(at.device))
        objective = (at.float() * weight.to(at.device)).sum()
        return list(torch.autograd.grad(objective, copies, allow_unused=True, materialize_grads=True))


def _direct(run: _Run, layer: int, grads: list[torch.Tensor], rows: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Gradients with respect to the residual stream before the layer's input norm (linearised at the clean point): what
    every upstream head's output meets on the direct path. The same for every upstream layer."""
    handle = run.handle
    arch = handle.arch
    for upstream in handle.layers:
        if upstream < layer and arch.post_attention_norm is not None and handle[upstream].post_norm is None:
            raise LorsaSurgeryError(f"On {arch.name} a head's output passes the post-attention norm before the residual "
                                    "stream; attribute edges with mlps='linearised', which goes through it.")
    if arch.input_norm is None:
        out = grads
    else:
        norm = getattr(arch.layer_list(handle.model)[layer], arch.input_norm)
        r = run.residual[layer][rows.to(run.residual[layer].device)].clone().requires_grad_()
        with torch.enable_grad():
            normed = norm(r)
            out = [torch.autograd.grad(normed, r, g.to(normed), retain_graph=True)[0].float() for g in grads]
    return {upstream: out for upstream in handle.layers if upstream < layer}


def _linearised(run: _Run, layer: int, grads: list[torch.Tensor], rows: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Gradients with respect to each upstream spliced layer's output, through the whole model (MLPs, norms, unspliced
    attention) with every spliced layer's attention input held at its clean value: the Jacobian at the clean point."""
    handle = run.handle
    upstream = [m for m in handle.layers if m < layer]
    outputs: dict[int, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def leaf(m: int):
        def hook(x):
            outputs[m] = x.detach().requires_grad_()
            return outputs[m]

        return hook

    def capture(x):
        seen["x"] = x

    fns = {f"L{m}.hook_in": (lambda x: x.detach()) for m in upstream}
    fns.update({f"L{m}.hook_out": leaf(m) for m in upstream})
    fns[f"L{layer}.hook_in"] = capture
    remove = add_hooks(handle, fns)
    mask = None if run.attention_mask is None else run.attention_mask[rows]
    try:
        with torch.enable_grad(), watch_attention(handle.model, [layer], stop=True):
            handle.model(**model_inputs(handle.model, run.input_ids[rows], mask))
    finally:
        remove()
    x = seen["x"]
    per_kind = [torch.autograd.grad(x, [outputs[m] for m in upstream], g.to(x), retain_graph=True, allow_unused=True,
                                    materialize_grads=True) for g in grads]
    return {m: [per_kind[k][i].float() for k in range(len(KINDS))] for i, m in enumerate(upstream)}


def attribute_edges(
    attribution: NodeAttribution, targets: Sequence[str] | None = None, *, top: int = 30, mlps: Mlps = "direct",
    batch_size: int = 16,
) -> EdgeAttribution:
    """Edges into `targets` (node ids `L3.H12@5`; default: the `top` nodes of largest |attribution| outside the first
    spliced layer) from every upstream node of the spliced layers, by kind (`EdgeAttribution`).

    The edge U -> D of kind q, k or v is Δout_U . J . d(g_D . a_D)/dX_kind: U's output (clean minus baseline activation
    times its output direction) carried to D's layer input (`mlps`) and dotted with the gradient of D's metric-weighted
    activation with respect to the copy of that input D reads its query, keys or values from. Summed over U and kinds it
    is the part of D's attribution that upstream heads carry.
    """
    if mlps not in ("direct", "linearised"):
        raise LorsaSurgeryError(f"mlps must be direct or linearised, got {mlps!r}.")
    run = attribution.run
    first = run.handle.layers[0]
    if targets is None:
        targets = [key for key, _ in attribution.top(top, layers=[m for m in run.handle.layers if m > first])]
    parsed = [attribution.node(key) for key in targets]
    B = attribution.input_ids.shape[0]
    keys: list[torch.Tensor] = []  # [E, 5]: target, kind, source layer, source unit, source position
    weights: list[torch.Tensor] = []
    carry = _direct if mlps == "direct" else _linearised
    for layer in sorted({p[0] for p in parsed}):
        if layer == first:
            continue
        mine = [(i, unit, pos) for i, (lay, unit, pos) in enumerate(parsed) if lay == layer]
        # One row per (target, prompt row): rows are independent, so one backward pass gives each its own gradient.
        pairs = [(i, unit, pos, b) for i, unit, pos in mine for b in range(B)]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            index = torch.tensor([c[0] for c in chunk])
            unit, pos, rows = (torch.tensor([c[j] for c in chunk]) for j in (1, 2, 3))
            grads = _input_gradients(run, layer, unit, pos, rows, attribution.widths[layer])
            for m, per_kind in carry(run, layer, grads, rows).items():
                W_O = run.handle[m].lorsa.W_O.detach().float()
                delta = run.delta[m][rows.to(run.delta[m].device)]
                for k, g in enumerate(per_kind):
                    edges = _by_unit((g.to(W_O.device) @ W_O.T) * delta.to(W_O.device), attribution.widths[m]) / B
                    n, p, u = (i.cpu() for i in edges.nonzero(as_tuple=True))
                    keys.append(torch.stack([index[n], torch.full_like(n, k), torch.full_like(n, m), u, p], dim=1))
                    weights.append(edges.detach().cpu()[n, p, u])
    # The rows of one target give the same edges apart: add them up.
    unique, which = torch.cat(keys).unique(dim=0, return_inverse=True) if keys else (torch.zeros(0, 5, dtype=torch.long), None)
    weight = torch.zeros(len(unique)).index_add_(0, which, torch.cat(weights)) if keys else torch.zeros(0)
    return EdgeAttribution(list(targets), mlps, attribution.names, *unique.T, weight)


# ---- checks against patching -----------------------------------------------------------------------------------


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long series (tied values share their mean rank); nan where either
    series is constant."""
    a, b = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (a, b))
    if a.shape != b.shape or len(a) < 2:
        raise LorsaSurgeryError("A rank correlation needs two series of the same length, with at least two values each.")
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x, tied values given the mean of the ranks they span."""
    _, inverse, counts = x.unique(return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts - 1) / 2)[inverse]


def _columns(attribution: NodeAttribution, layer: int, unit: int) -> slice:
    """The rank-1 heads a node is made of (one, or an exact copy's QK group)."""
    width = attribution.widths[layer]
    return slice(unit * width, (unit + 1) * width)


def _frozen_firing(run: _Run) -> dict[str, Any]:
    """Hooks that hold every head's firing at the clean run's: a head passes its pre-activation on where it fired
    and stays off elsewhere, in runs of the clean rows (each repeated any number of times, in turn)."""
    pre: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(z: torch.Tensor) -> None:
            pre[layer] = z

        return hook

    def hold(layer: int):
        fired = run.clean[layer] != 0

        def hook(acts: torch.Tensor) -> torch.Tensor:
            held = fired.to(acts.device).repeat_interleave(acts.shape[0] // fired.shape[0], 0)
            return torch.where(held, pre[layer], torch.zeros_like(acts))

        return hook

    fns = {f"L{layer}.hook_z": keep(layer) for layer in run.handle.layers}
    return fns | {f"L{layer}.hook_acts": hold(layer) for layer in run.handle.layers}


@torch.no_grad()
def patch_heads(attribution: NodeAttribution, metric: Metric, heads: Sequence[str], *, freeze: bool = False,
                batch_size: int = 32) -> torch.Tensor:
    """[len(heads)] what each node (`L3.H12`, or an exact copy's MHSA head `L3.A2`) carries of the metric, measured:
    the clean metric minus the metric with that one node's activation at every position set to its baseline
    activation (the corrupted run's, the mean or zero, as attributed), mean over the rows of the attribution's input.
    `NodeAttribution.top_heads` is its first-order estimate.

    With `freeze`, every head fires where it fired in the clean run and nowhere else, passing its pre-activation on:
    a patch then switches no head of a later layer on or off (no top-K or threshold jump), and what is left of its
    difference from the attribution is the smooth part of the model's nonlinearity. `batch_size // rows` heads are
    patched per forward pass, each in its own copy of the rows, so `metric` must score each row on its own (every
    metric here does)."""
    run = attribution.run
    parsed = [attribution.node(f"{head}@0")[:2] for head in heads]
    B = run.input_ids.shape[0]
    group = max(1, batch_size // B)
    chunk: list[tuple[int, int]] = []

    def patch(layer: int):
        base = run.clean[layer] - run.delta[layer]

        def hook(acts: torch.Tensor) -> torch.Tensor | None:
            which = torch.zeros(len(chunk), acts.shape[-1], dtype=torch.bool, device=acts.device)
            for g, (lay, unit) in enumerate(chunk):
                if lay == layer:
                    which[g, _columns(attribution, layer, unit)] = True
            if not which.any():
                return None
            # Row b * G + g is prompt b with chunk[g] patched (the rows are repeated that way below).
            return torch.where(which.repeat(B, 1)[:, None], base.to(acts).repeat_interleave(len(chunk), 0), acts)

        return hook

    values = torch.empty(len(parsed))
    with contextlib.ExitStack() as stack:
        if freeze:  # installed first: the patch then overrides the held activations
            stack.enter_context(hooks(run.handle, _frozen_firing(run)))
        stack.enter_context(hooks(run.handle, {f"L{layer}.hook_acts": patch(layer) for layer in run.handle.layers}))
        for start in range(0, len(parsed), group):
            chunk[:] = parsed[start : start + group]
            ids = run.input_ids.repeat_interleave(len(chunk), 0)
            mask = None if run.attention_mask is None else run.attention_mask.repeat_interleave(len(chunk), 0)
            scores = metric(forward(run.handle, ids, mask), ids, mask).float()
            values[start : start + len(chunk)] = scores.view(B, len(chunk)).mean(0).cpu()
    return attribution.clean_metric - values


@torch.no_grad()
def path_patch(attribution: NodeAttribution, metric: Metric, source: str, target: str, kind: str,
               mlps: Mlps = "direct", *, freeze: bool = False) -> float:
    """What one edge carries of the metric, measured: the clean metric minus the metric with only the upstream node's
    output (clean minus baseline activation, times its output direction) taken out of only the downstream node's
    `kind` read (q, k or v), everything else clean; mean over the rows of the attribution's input. With "direct" the
    output is taken out of the residual stream the downstream layer reads; with "linearised" where it is written, and
    MLPs carry the change on while every spliced attention in between reads its clean input. The edge of
    `attribute_edges` with the same `mlps` is its first-order estimate. With `freeze`, every head fires where it fired
    in the clean run, as in `patch_heads`: the downstream node, and the heads after it, cannot switch on or off."""
    if kind not in KINDS or mlps not in ("direct", "linearised"):
        raise LorsaSurgeryError(f"An edge's kind is q, k or v and mlps direct or linearised, got {kind!r} and {mlps!r}.")
    run = attribution.run
    handle, ids, mask = run.handle, run.input_ids, run.attention_mask
    (m, i, s), (l, j, t) = attribution.node(source), attribution.node(target)
    if m >= l:
        raise LorsaSurgeryError(f"{source} is not in a layer below {target}'s.")
    W_O = handle[m].lorsa.W_O.detach()
    up, down = _columns(attribution, m, i), _columns(attribution, l, j)
    out = run.delta[m][:, s, up].to(W_O) @ W_O[up]  # [B, d]

    def take_out(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, s] -= out.to(x)
        return x

    with hooks(handle, _frozen_firing(run)) if freeze else contextlib.nullcontext():
        if mlps == "direct":
            norm = handle.arch.input_norm
            residual = take_out(run.residual[l])
            x = residual if norm is None else getattr(handle.arch.layer_list(handle.model)[l], norm)(residual)
        else:
            frozen = {f"L{k}.hook_in": (lambda x, ctx, v=run.inputs[k]: v) for k in handle.layers if m < k < l}
            with hooks(handle, {f"L{m}.hook_out": take_out, **frozen}):
                x = run_with_cache(handle, ids, [f"L{l}.hook_in"], attention_mask=mask, stop=True)[f"L{l}.hook_in"]
        with hooks(handle, {f"L{l}.hook_in": lambda _: x}):
            read = run_with_cache(handle, ids, [f"L{l}.hook_{kind}"], attention_mask=mask, stop=True)[f"L{l}.hook_{kind}"]
        with hooks(handle, {f"L{l}.hook_{kind}": lambda _: read}):
            acts = run_with_cache(handle, ids, [f"L{l}.hook_acts"], attention_mask=mask, stop=True)[f"L{l}.hook_acts"]
        value = acts[:, t, down]

        def clamp(a: torch.Tensor) -> torch.Tensor:
            a = a.clone()
            a[:, t, down] = value.to(a)
            return a

        with hooks(handle, {f"L{l}.hook_acts": clamp}):
            scores = metric(forward(handle, ids, mask), ids, mask)
    return attribution.clean_metric - float(scores.float().mean())


# ---- the graph --------------------------------------------------------------------------------------------------


@dataclass
class Graph:
    """A pruned circuit: nodes (a head at a position) and Q/K/V edges between them, with what the page shows."""

    metric: str
    """What was measured."""
    baseline: str
    """corrupt, mean or zero."""
    clean_metric: float
    """The metric of the clean run."""
    baseline_metric: float
    """The metric of the baseline run."""
    tokens: list[str]
    """The clean prompt's tokens as text (of its first row)."""
    nodes: list[dict[str, Any]]
    """id (`L3.H12@5`), layer, head (`L3.H12`, or `L3.A2` for an MHSA head of an exact copy), position, token,
    attribution, label (the catalog's, or ""), promoted (the tokens its output direction promotes most)."""
    edges: list[dict[str, Any]]
    """source and target (node ids), kind (q, k or v), weight (in units of the metric)."""
    node_share: float
    """The share of the total |attribution| the nodes kept carry at least."""
    edge_share: float
    """The share of the |weight| of the edges between kept nodes the edges kept carry at least."""
    mlps: str = ""
    """How edges treat MLPs (direct, linearised), or "" when the graph has no edges."""
    verification: dict[str, Any] = field(default_factory=dict)
    """Faithfulness and necessity, when measured (`Faithfulness.to_dict`, `Necessity.to_dict`)."""

    def heads(self) -> list[str]:
        """The heads of the nodes (`L3.H12`, `L3.A2`), each once, in node order."""
        return list(dict.fromkeys(node["head"] for node in self.nodes))

    def to_dict(self) -> dict[str, Any]:
        return {"format": GRAPH_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Graph":
        if not isinstance(d, dict) or d.get("format") != GRAPH_FORMAT:
            raise LorsaSurgeryError(f"Not a lorsa-surgery circuit graph (expected format {GRAPH_FORMAT!r}).")
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"})
        except TypeError as e:
            raise LorsaSurgeryError(f"Malformed circuit graph: {e}.") from None

    def save(self, path: str | Path) -> Path:
        return files.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        return cls.from_dict(files.read_json(path, expect=dict))


def _smallest_share(values: list[float], share: float) -> int:
    """How many of `values` (sorted by |value|, largest first) it takes to carry `share` of their total |value|."""
    total = sum(abs(v) for v in values)
    running = 0.0
    for n, v in enumerate(values, 1):
        running += abs(v)
        if running >= share * total - 1e-12 * total:
            return n
    return len(values)


def prune(
    attribution: NodeAttribution, edges: EdgeAttribution | None = None, node_share: float = 0.8, edge_share: float = 0.8,
    *, tokenizer=None, max_nodes: int | None = None, promoted: int = 5,
) -> Graph:
    """The fewest nodes carrying `node_share` of the total |attribution| (at most `max_nodes`), and among the edges
    between them the fewest carrying `edge_share` of their total |weight|, as a `Graph`. With a tokenizer, tokens and
    the `promoted` tokens of each Lorsa head's output direction are written as text (else as <id>)."""
    for name, share in (("node_share", node_share), ("edge_share", edge_share)):
        if not 0 < share <= 1:
            raise LorsaSurgeryError(f"{name} must be in (0, 1], got {share!r}.")
    ranked = attribution.top()
    kept = ranked[: _smallest_share([v for _, v in ranked], node_share)][:max_nodes]
    ids = {key for key, _ in kept}
    between = sorted((r for r in (edges.records() if edges is not None else []) if r[0] in ids and r[1] in ids),
                     key=lambda r: -abs(r[3]))
    between = between[: _smallest_share([r[3] for r in between], edge_share)] if between else []
    handle = attribution.run.handle
    row = attribution.input_ids[0].tolist()
    text = lambda token: token_text(tokenizer, token)
    nodes = []
    for key, value in kept:
        layer, unit, position = attribution.node(key)
        head = key.partition("@")[0]
        node = {"id": key, "layer": layer, "head": head, "position": position, "token": text(row[position]),
                "attribution": value, "label": "", "promoted": []}
        if attribution.widths[layer] == 1:
            node["label"] = handle[layer].source.catalog.get(unit, {}).get("label", "")
            node["promoted"] = [text(int(t)) for t in logit_scores(handle, layer, [unit])[0].topk(promoted).indices]
        nodes.append(node)
    return Graph(
        metric=attribution.metric, baseline=attribution.baseline, clean_metric=attribution.clean_metric,
        baseline_metric=attribution.baseline_metric, tokens=[text(t) for t in row], nodes=nodes,
        edges=[{"source": s, "target": t, "kind": k, "weight": w} for s, t, k, w in between],
        node_share=node_share, edge_share=edge_share, mlps=edges.mlps if edges is not None else "",
    )


# ---- verification -----------------------------------------------------------------------------------------------


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, seed: int, resamples: int = 2000) -> Estimate:
    """mean(numerator) / mean(denominator) over prompts, with a 95% bootstrap interval (prompts resampled)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(numerator), (resamples, len(numerator)), generator=g)
    ratios = numerator[idx].mean(1) / denominator[idx].mean(1)
    return Estimate(float(numerator.mean() / denominator.mean()), float(ratios.nanquantile(0.025)), float(ratios.nanquantile(0.975)))


@dataclass
class HeadStats:
    """Each head's mean activation and firing rate over the tokens of some prompts, per spliced layer."""

    means: dict[int, torch.Tensor]
    """[n_ov] mean activation, zeros included."""
    rates: dict[int, torch.Tensor]
    """[n_ov] share of tokens on which the head fires."""


@torch.no_grad()
def head_stats(target: Splice | torch.nn.Module, prompts: Sequence[torch.Tensor]) -> HeadStats:
    """Mean activations (the values of mean ablation) and firing rates of every head of the spliced layers over the
    tokens of `prompts` (one forward pass each)."""
    handle = splice_of(target)
    sums = {layer: 0.0 for layer in handle.layers}
    fired = dict(sums)
    count = 0
    for ids in prompts:
        cache = run_with_cache(handle, _check_input(ids), ["hook_acts"])
        for layer in handle.layers:
            acts = cache[f"L{layer}.hook_acts"].float().flatten(0, 1).cpu()
            sums[layer] = sums[layer] + acts.sum(0)
            fired[layer] = fired[layer] + (acts != 0).sum(0)
        count += cache[f"L{handle.layers[0]}.hook_acts"].shape[:2].numel()
    return HeadStats({layer: sums[layer] / count for layer in handle.layers}, {layer: fired[layer] / count for layer in handle.layers})


def _circuit_heads(handle: Splice, circuit: Graph | HeadSpec) -> list[HeadRef]:
    if isinstance(circuit, Graph):
        circuit = circuit.heads()
    if isinstance(circuit, (list, tuple)) and not circuit:
        return []
    return resolve_heads(circuit, handle)


def _metric_per_prompt(handle: Splice, prompts: Sequence[torch.Tensor], metric: Metric) -> torch.Tensor:
    values = []
    for ids in prompts:
        ids = _check_input(ids)
        values.append(float(metric(forward(handle, ids), ids, None).mean()))
    return torch.tensor(values, dtype=torch.float64)


@dataclass
class Faithfulness:
    """How much of the metric the circuit's heads keep on their own, every other head of the spliced layers mean-ablated."""

    heads: list[str]
    """The circuit's heads."""
    prompts: int
    full: torch.Tensor
    """[prompts] the metric with every head as it is."""
    circuit: torch.Tensor
    """[prompts] the metric with only the circuit's heads as they are."""
    empty: torch.Tensor
    """[prompts] the metric with every head mean-ablated."""
    share: Estimate
    """mean(circuit) / mean(full): the share of the metric kept."""
    normalised: Estimate
    """mean(circuit - empty) / mean(full - empty): the share of what the heads add over their means."""

    def to_dict(self) -> dict[str, Any]:
        return {"heads": len(self.heads), "prompts": self.prompts, "full": float(self.full.mean()),
                "circuit": float(self.circuit.mean()), "empty": float(self.empty.mean()),
                "share": asdict(self.share), "normalised": asdict(self.normalised)}


def faithfulness(
    target: Splice | torch.nn.Module, prompts: Sequence[torch.Tensor], circuit: Graph | HeadSpec, metric: Metric,
    *, stats: HeadStats | None = None, seed: int = 0,
) -> Faithfulness:
    """Keep the circuit's heads (a `Graph`'s, or named), mean-ablate every other head of the spliced layers, and measure
    the share of the metric kept over `prompts` (token ids, each [T] or [1, T]), with 95% bootstrap intervals. Means
    come from `stats` (default: `head_stats` over the prompts)."""
    handle = splice_of(target)
    refs = _circuit_heads(handle, circuit)
    if not prompts:
        raise LorsaSurgeryError("Faithfulness needs at least one prompt.")
    stats = stats or head_stats(handle, prompts)
    full = _metric_per_prompt(handle, prompts, metric)
    with _ablated(handle, stats.means, set(refs)):
        kept = _metric_per_prompt(handle, prompts, metric)
    with _ablated(handle, stats.means):
        empty = _metric_per_prompt(handle, prompts, metric)
    return Faithfulness([str(r) for r in refs], len(prompts), full, kept, empty, _ratio(kept, full, seed),
                        _ratio(kept - empty, full - empty, seed))


@dataclass
class Necessity:
    """How much of the metric is lost when the circuit's heads are mean-ablated, against as many heads that fire as
    often (a firing-matched random control)."""

    heads: list[str]
    """The circuit's heads."""
    control: list[str]
    """As many other heads of the same layers, each firing about as often as one of the circuit's."""
    prompts: int
    full: torch.Tensor
    """[prompts] the metric with every head as it is."""
    ablated: torch.Tensor
    """[prompts] the metric with the circuit's heads mean-ablated."""
    control_ablated: torch.Tensor
    """[prompts] the metric with the control heads mean-ablated."""
    lost: Estimate
    """mean(full - ablated) / mean(full)."""
    control_lost: Estimate
    """mean(full - control_ablated) / mean(full)."""

    def to_dict(self) -> dict[str, Any]:
        return {"heads": len(self.heads), "prompts": self.prompts, "full": float(self.full.mean()),
                "ablated": float(self.ablated.mean()), "control_ablated": float(self.control_ablated.mean()),
                "lost": asdict(self.lost), "control_lost": asdict(self.control_lost)}


def matched_heads(stats: HeadStats, refs: Sequence[HeadRef], seed: int = 0) -> list[HeadRef]:
    """For each head, a different head outside `refs` whose firing rate is nearest (ties at random): from its own layer,
    or from any spliced layer once its own has none left."""
    rng = random.Random(seed)
    taken = set(refs)
    chosen = []
    for ref in refs:
        rate = float(stats.rates[ref.layer][ref.index])
        for layers in ([ref.layer], list(stats.rates)):
            pool = [HeadRef(layer, h) for layer in layers for h in range(len(stats.rates[layer])) if HeadRef(layer, h) not in taken]
            if pool:
                break
        else:
            raise LorsaSurgeryError(f"No head is left to match {ref} with: the circuit holds every head.")
        rng.shuffle(pool)
        best = min(pool, key=lambda r: abs(float(stats.rates[r.layer][r.index]) - rate))
        taken.add(best)
        chosen.append(best)
    return chosen


def necessity(
    target: Splice | torch.nn.Module, prompts: Sequence[torch.Tensor], circuit: Graph | HeadSpec, metric: Metric,
    *, stats: HeadStats | None = None, seed: int = 0,
) -> Necessity:
    """Mean-ablate the circuit's heads and measure the share of the metric lost over `prompts`, beside a firing-matched
    random set of as many heads (`matched_heads`), with 95% bootstrap intervals."""
    handle = splice_of(target)
    refs = _circuit_heads(handle, circuit)
    if not refs or not prompts:
        raise LorsaSurgeryError("Necessity needs at least one circuit head and one prompt.")
    stats = stats or head_stats(handle, prompts)
    control = matched_heads(stats, refs, seed)
    full = _metric_per_prompt(handle, prompts, metric)
    outcomes = []
    for heads in (refs, control):
        means = {str(r): float(stats.means[r.layer][r.index]) for r in heads}
        with InterventionSet([Ablate(list(heads), how="mean", means=means)]).applied(handle):
            outcomes.append(_metric_per_prompt(handle, prompts, metric))
    ablated, control_ablated = outcomes
    return Necessity([str(r) for r in refs], [str(r) for r in control], len(prompts), full, ablated, control_ablated,
                     _ratio(full - ablated, full, seed), _ratio(full - control_ablated, full, seed))
