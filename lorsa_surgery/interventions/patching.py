"""Activation patching through Lorsa heads: cache a source run, sweep edits over heads x positions, score them.

    clean = cache_run(model, clean_ids, heads)
    result = sweep(model, corrupted_ids, heads, LogitDiff(good, bad), source=clean)
    result.values  # [len(heads), len(positions)]: the metric with one (head, position) patched from the clean run

Metrics take (logits [B, T, V], input_ids [B, T], attention_mask [B, T] or None) and give one number per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.interventions.heads import HeadSpec, head_name, resolve_heads
from lorsa_surgery.interventions.edits import HeadCache, InterventionSet, Recorder, full_context, splice_of
from lorsa_surgery.host.metrics import next_token_loss, token_windows
from lorsa_surgery.host.hooks import HeadContext, model_inputs
from lorsa_surgery.host.splicing import Splice

# ---- running ------------------------------------------------------------------------------------------------


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    input_ids = torch.as_tensor(input_ids)
    return input_ids[None] if input_ids.dim() == 1 else input_ids


@torch.no_grad()
def forward(target: Splice | nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of one uncached pass. With a padding mask, positions count from each row's first real token,
    as generate() counts them, so left-padded rows see the positions they would see alone."""
    model = splice_of(target).model
    return model(**model_inputs(model, input_ids, attention_mask)).logits


@torch.no_grad()
def cache_run(
    target: Splice | nn.Module, input_ids: torch.Tensor, heads: HeadSpec, attention_mask: torch.Tensor | None = None
) -> HeadCache:
    """Run the model once and keep the activations of the given heads (only those, stored sparse), for Patch or
    resample ablation. Interventions already active shape the run."""
    with Recorder(target, heads) as rec:
        forward(target, input_ids, attention_mask)
    return rec.cache()


# ---- metrics --------------------------------------------------------------------------------------------------


@dataclass
class LogitDiff:
    """logit[good] - logit[bad] at one column of the input (default: the last, the next-token prediction)."""

    good: int
    """Token id whose logit counts positively (with `columns`: the column of the input holding it)."""
    bad: int
    """Token id whose logit counts negatively (with `columns`: the column of the input holding it)."""
    position: int = -1
    """Column of the input whose prediction is scored."""
    columns: bool = False
    """Read each row's two tokens from its own columns `good` and `bad`: one metric for a batch of prompts whose
    answers differ (IOI: the indirect object's and the subject's first mentions)."""

    @property
    def name(self) -> str:
        return f"logit[ids[{self.good}]] - logit[ids[{self.bad}]]" if self.columns else f"logit[{self.good}] - logit[{self.bad}]"

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        row = logits[:, self.position].float()
        if self.columns:
            tokens = input_ids[:, [self.good, self.bad]].to(row.device)
        else:
            tokens = torch.tensor([[self.good, self.bad]], device=row.device).expand(len(row), 2)
        scores = row.gather(-1, tokens)
        return scores[:, 0] - scores[:, 1]


@dataclass
class Probability:
    """Probability of one token at one column of the input (default: the last)."""

    token: int
    """Token id."""
    position: int = -1
    """Column of the input whose prediction is scored."""
    log: bool = False
    """Score the log-probability: additive over independent effects, which attribution's linear estimate assumes."""

    @property
    def name(self) -> str:
        return f"{'log ' if self.log else ''}p[{self.token}]"

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        row = logits[:, self.position].float()
        return (row.log_softmax(-1) if self.log else row.softmax(-1))[:, self.token]


@dataclass
class RepeatGain:
    """On rows that write `length` tokens twice after one start token: the mean over the repeated tokens of their
    log-probability in the second copy minus in the first, where nothing predicts them (the same tokens, so how
    common each is cancels). Zero when the model copies nothing from its context; what induction adds."""

    length: int
    """Tokens in each copy."""

    @property
    def name(self) -> str:
        return f"repeat gain ({self.length} tokens)"

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        L = self.length
        if input_ids.shape[1] != 2 * L + 1:
            raise LorsaSurgeryError(f"RepeatGain({L}) scores rows of {2 * L + 1} tokens (a start token and two copies), "
                                    f"not {input_ids.shape[1]}.")
        logits = logits.float()
        following = input_ids[:, 1:, None].to(logits.device)
        logp = logits[:, :-1].gather(-1, following)[..., 0] - logits[:, :-1].logsumexp(-1)  # [B, T-1]: of token t+1 at t
        # Columns 1..L-1 predict the first copy's tokens 2..L; columns L+1..2L-1 predict the same tokens again.
        return (logp[:, L + 1 : 2 * L] - logp[:, 1:L]).mean(-1)


@dataclass
class Loss:
    """Mean next-token cross-entropy of each row over its real tokens."""

    @property
    def name(self) -> str:
        return "loss"

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        losses, keep = next_token_loss(logits, input_ids, attention_mask)
        return (losses * keep).sum(-1) / keep.sum(-1).clamp_min(1)


Metric = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ---- sweeps ---------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """A metric for every (head, position) edit of a sweep, with the labels of both axes."""

    values: torch.Tensor
    """[len(heads), len(positions)] the metric with that one head edited at that one position."""
    heads: list[str]
    """Head refs of the rows (`L3.H5`)."""
    names: list[str]
    """Display names of the rows, with catalog labels (`L3.H5 (induction)`)."""
    positions: list[int]
    """Absolute positions of the columns."""
    metric: str
    """What was measured."""
    baseline: float
    """The metric of the unedited run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "baseline": self.baseline, "heads": self.heads, "names": self.names,
            "positions": self.positions, "values": self.values.tolist(),
        }

    def top(self, n: int = 10) -> list[tuple[str, int, float]]:
        """The n (head name, position, value) entries that move the metric most from the baseline."""
        change = (self.values - self.baseline).abs().flatten()
        order = change.argsort(descending=True)[:n].tolist()
        P = len(self.positions)
        return [(self.names[i // P], self.positions[i % P], float(self.values.flatten()[i])) for i in order]


def _sweep_hook(indices: torch.Tensor, state: dict, layer: int, read):
    """Edit, in each row, the one (head, position) the row's variant names, if that head is in this layer."""

    def hook(acts: torch.Tensor, ctx: HeadContext) -> torch.Tensor | None:
        ctx = full_context(ctx, acts)
        col, pos = state["col"][layer].to(acts.device), state["pos"].to(acts.device)
        selected = (ctx.position_ids == pos[:, None]) & (col[:, None] >= 0)
        if not selected.any():
            return None
        R, T, _ = acts.shape
        which = indices.to(acts.device)[col.clamp_min(0)][:, None, None].expand(R, T, 1)
        current = acts.gather(-1, which)[..., 0]
        if read is None:
            new = torch.zeros_like(current)
        else:
            cached = read(acts[..., indices.to(acts.device)], ctx, selected)  # [R, T, heads of this layer]
            new = cached.gather(-1, col.clamp_min(0)[:, None, None].expand(R, T, 1))[..., 0]
        return acts.scatter(-1, which, torch.where(selected, new, current)[..., None])

    return hook


@torch.no_grad()
def sweep(
    target: Splice | nn.Module,
    input_ids: torch.Tensor,
    heads: HeadSpec,
    metric: Metric,
    *,
    source: HeadCache | None = None,
    positions: list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SweepResult:
    """The metric with each head edited at each position, one (head, position) at a time, many per batch.

    With `source` the head's activation is patched in from the cached run (same absolute position); without, it is
    zeroed. `positions` are absolute (default: every position of the input). The metric is averaged over the rows
    of `input_ids`.
    """
    handle = splice_of(target)
    input_ids = _as_batch(input_ids)
    B, T = input_ids.shape
    refs = resolve_heads(heads, handle)
    if positions is None:
        positions = list(range(T if attention_mask is None else int(attention_mask.sum(-1).max())))
    if not positions:
        raise LorsaSurgeryError("A sweep needs at least one position.")
    layers = sorted({r.layer for r in refs})
    layer_refs = {layer: [r for r in refs if r.layer == layer] for layer in layers}
    variants = [(i, p) for i in range(len(refs)) for p in positions]
    group = max(1, batch_size // B)

    baseline = float(metric(forward(handle, input_ids, attention_mask), input_ids, attention_mask).mean())
    state: dict[str, Any] = {"col": {}, "pos": None}
    installed = []
    for layer in layers:
        read = source.reader(layer_refs[layer]) if source is not None else None
        indices = torch.tensor([r.index for r in layer_refs[layer]])
        installed.append((handle[layer], _sweep_hook(indices, state, layer, read)))
    values = torch.empty(len(variants))
    try:
        for site, hook in installed:
            site.hooks.append(hook)
        for start in tqdm(range(0, len(variants), group), desc="patching sweep", disable=not progress):
            chunk = variants[start : start + group]
            G = len(chunk)
            # Row r = b * G + g is prompt b under variant g: cached rows map to prompts as r * rows // (B * G).
            state["pos"] = torch.tensor([p for _, p in chunk]).repeat(B)
            for layer in layers:
                col = [layer_refs[layer].index(refs[i]) if refs[i].layer == layer else -1 for i, _ in chunk]
                state["col"][layer] = torch.tensor(col).repeat(B)
            ids = input_ids.repeat_interleave(G, 0)
            mask = attention_mask.repeat_interleave(G, 0) if attention_mask is not None else None
            scores = metric(forward(handle, ids, mask), ids, mask)
            values[start : start + G] = scores.view(B, G).mean(0).cpu()
    finally:
        for site, hook in installed:
            if hook in site.hooks:
                site.hooks.remove(hook)
    return SweepResult(
        values=values.view(len(refs), len(positions)), heads=[str(r) for r in refs],
        names=[head_name(r, handle) for r in refs], positions=list(positions),
        metric=getattr(metric, "name", type(metric).__name__), baseline=baseline,
    )


# ---- effects of a set on text -----------------------------------------------------------------------------------


@dataclass
class Effect:
    """What an intervention set does to the model's predictions on one text."""

    text: str
    """The text (as given)."""
    tokens: int
    """Tokens predicted."""
    loss_before: float
    """Mean next-token cross-entropy without the interventions."""
    loss_after: float
    """The same with them."""
    kl: float
    """Mean KL divergence (nats) of the next-token distribution, before || after, over the predicted tokens."""
    next_before: int
    """Most likely token after the text, without the interventions."""
    next_after: int
    """The same with them."""


@torch.no_grad()
def effect(
    target: Splice | nn.Module, tokenizer, texts: list[str], interventions: InterventionSet, max_length: int = 256
) -> list[Effect]:
    """Loss, KL and next-token change that `interventions` cause on each text (long texts in windows of max_length)."""
    handle = splice_of(target)
    effects = []
    for text in texts:
        loss = torch.zeros(2, dtype=torch.float64)
        kl, count, nexts = 0.0, 0, (0, 0)
        for ids in token_windows(tokenizer, [text], max_length):
            before = forward(handle, ids).float()
            with interventions.applied(handle):
                after = forward(handle, ids).float()
            if not (before.isfinite().all() and after.isfinite().all()):
                which = "the model's" if not before.isfinite().all() else "with the interventions applied, the"
                raise LorsaSurgeryError(f"On {text[:40]!r} {which} logits are NaN or infinite; no effect can be measured.")
            for i, logits in enumerate((before, after)):
                loss[i] += next_token_loss(logits, ids)[0].sum().item()
            logp, logq = before[0, :-1].log_softmax(-1), after[0, :-1].log_softmax(-1)
            kl += float((logp.exp() * (logp - logq)).sum())
            count += ids.shape[1] - 1
            nexts = (int(before[0, -1].argmax()), int(after[0, -1].argmax()))
        if count == 0:
            raise LorsaSurgeryError(f"The text {text[:40]!r} has fewer than two tokens.")
        effects.append(Effect(text, count, float(loss[0]) / count, float(loss[1]) / count, kl / count, *nexts))
    return effects
