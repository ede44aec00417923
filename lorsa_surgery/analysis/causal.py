"""Causal checks of head families: ablate the heads of a family and measure the behaviour the family is named for,
against as many randomly chosen heads that fire as often (a matched control), with 95% bootstrap intervals over
prompts; then patch the family's clean activations back into the ablated run to show the behaviour returns.

Behaviours (higher is better for all three):
- induction: accuracy of predicting the next token in the second half of repeated random word sequences, the words
  drawn from the whole vocabulary or (`words="family"`) from the words the family's heads promote;
- name_mover: IOI logit difference, indirect object minus subject, at the last token;
- successor: minus the mean rank of the next item of an ordinal sequence (0 is best).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorsa_surgery.analysis.attribution import logit_scores
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.analysis.families import Probe, ioi_probe, repeated_probe, successor_probe, word_tokens
from lorsa_surgery.analysis.names import BEHAVIOURS, WORDS
from lorsa_surgery.interventions.heads import by_layer, resolve_heads
from lorsa_surgery.interventions.edits import Ablate, InterventionSet, Patch
from lorsa_surgery.interventions.patching import cache_run, forward
from lorsa_surgery.host.splicing import Splice


@dataclass
class Estimate:
    """A mean over prompts and its 95% bootstrap interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class CausalCheck:
    """What ablating a family does to its behaviour, beside a matched random control."""

    family: str
    behaviour: str
    heads: list[str]
    """The family's heads, ablated together."""
    control: list[str]
    """As many other heads, each firing about as often on the probe as one of the family's."""
    prompts: int
    clean: Estimate
    ablated: Estimate
    control_ablated: Estimate
    restored: Estimate
    """Family ablated, then its clean activations patched back."""
    effect: Estimate
    """clean - ablated, per prompt."""
    control_effect: Estimate
    """clean - control_ablated, per prompt."""
    also_ablated: list[str]
    """Heads of other layers ablated in every run, clean included (none: the model as spliced)."""


INDUCTION_LENGTH = 20
"""Words in each half of an induction behaviour prompt."""


@torch.no_grad()
def family_words(handle: Splice, layer: int, heads: list[int], tokenizer, k: int = 3) -> list[int]:
    """The whole-word tokens (`word_tokens`) each head's output direction promotes most, k per head, pooled: material
    for repeated sequences on which a rank-1 induction head has something of its own to copy."""
    vocabulary = torch.tensor(word_tokens(tokenizer, len(tokenizer)))
    scores = logit_scores(handle, layer, heads)[:, vocabulary]
    pooled = sorted(set(vocabulary[scores.topk(k, dim=-1).indices].flatten().tolist()))
    if len(pooled) < INDUCTION_LENGTH:
        raise LorsaSurgeryError(f"The {len(heads)} heads promote {len(pooled)} distinct words; a repeated sequence needs "
                                f"{INDUCTION_LENGTH}. Pass more heads or a larger k.")
    return pooled


def behaviour_probe(family: str, tokenizer, n: int, seed: int, words: list[int] | None = None) -> Probe:
    """Prompts on which a family's behaviour is measured; `words` (token ids) replaces the induction prompts' random
    words."""
    if family == "induction":
        return repeated_probe(tokenizer, n, INDUCTION_LENGTH, seed, "induction", words)
    if family == "name_mover":
        return ioi_probe(tokenizer, n, seed)
    if family == "successor":
        return successor_probe(tokenizer, n, seed)
    raise LorsaSurgeryError(f"No causal check for {family!r}; there is one for {', '.join(BEHAVIOURS)}.")


@torch.no_grad()
def behaviour(handle: Splice, family: str, probe: Probe) -> torch.Tensor:
    """The family's behaviour on each prompt of the probe, [B], under whatever interventions are active."""
    logits = forward(handle, probe.input_ids, probe.attention_mask).float().cpu()
    query, target = probe.query, probe.target
    per_row = []
    for b in range(len(logits)):
        t = query[b].nonzero().flatten()
        row, want = logits[b, t], target[b, t]
        if family == "induction":
            per_row.append((row.argmax(-1) == want).float().mean())
        elif family == "name_mover":
            per_row.append((row.gather(-1, want[:, None]) - row.gather(-1, probe.contrast[b, t][:, None])).mean())
        else:
            rank = (row > row.gather(-1, want[:, None])).sum(-1).float()
            per_row.append(-rank.mean())
    return torch.stack(per_row)


def _estimate(values: torch.Tensor, seed: int, resamples: int = 2000) -> Estimate:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=g)
    means = values[idx].mean(1)
    return Estimate(float(values.mean()), float(means.quantile(0.025)), float(means.quantile(0.975)))


@torch.no_grad()
def matched_control(handle: Splice, layer: int, heads: list[int], probe: Probe, seed: int = 0) -> list[int]:
    """For each head, a different head outside the list that fires on about as many probe tokens (nearest firing
    frequency, ties broken at random)."""
    n = handle[layer].lorsa.cfg.n_ov_heads
    acts = cache_run(handle, probe.input_ids, f"L{layer}.H0-{n - 1}", probe.attention_mask).dense()
    frequency = (acts != 0)[probe.attention_mask.bool()[:, : acts.shape[1]]].float().mean(0)
    rng = random.Random(seed)
    pool = [h for h in range(n) if h not in set(heads)]
    rng.shuffle(pool)
    chosen = []
    for h in heads:
        best = min(pool, key=lambda c: abs(float(frequency[c] - frequency[h])))
        pool.remove(best)
        chosen.append(best)
    return chosen


def causal_check(handle: Splice, tokenizer, layer: int, family: str, heads: list[int], n_prompts: int = 32,
                 seed: int = 0, words: str = "random", also_ablate: Sequence[str] = ()) -> CausalCheck:
    """Ablate `heads` (zero) of the module spliced at `layer` and measure `family`'s behaviour on fresh prompts, beside
    a matched random control and the family patched back from the clean run. `words` (induction only, one of `WORDS`)
    says where the repeated sequences take their words. `also_ablate` (head references of other spliced layers, e.g.
    the exact copies' heads that carry the same behaviour) are ablated in every run, the clean one included, so the
    check measures what the family does once those are gone."""
    if not heads:
        raise LorsaSurgeryError(f"No heads to ablate for {family}.")
    also = [Ablate(list(also_ablate))] if also_ablate else []
    if also and layer in by_layer(resolve_heads(list(also_ablate), handle)):
        raise LorsaSurgeryError(f"also_ablate names heads of layer {layer}, the family's own; name other layers' heads.")
    if words not in WORDS:
        raise LorsaSurgeryError(f"words must be one of {', '.join(WORDS)}, not {words!r}.")
    if words == "family" and family != "induction":
        raise LorsaSurgeryError("Only the induction check draws its prompts from the family's words.")
    pool = family_words(handle, layer, heads, tokenizer) if words == "family" else None
    probe = behaviour_probe(family, tokenizer, n_prompts, seed + 1000, pool)  # not the prompts the detector scored on
    refs = [f"L{layer}.H{h}" for h in heads]
    with InterventionSet(also).applied(handle):
        control = matched_control(handle, layer, heads, probe, seed)
        clean = behaviour(handle, family, probe)
        source = cache_run(handle, probe.input_ids, refs, probe.attention_mask)
    runs = {}
    for name, records in (("ablated", [Ablate(refs)]), ("control", [Ablate([f"L{layer}.H{h}" for h in control])]),
                          ("restored", [Ablate(refs), Patch(refs, source)])):
        with InterventionSet(also + records).applied(handle):
            runs[name] = behaviour(handle, family, probe)
    described = BEHAVIOURS[family] + (f", the words drawn from the {len(pool)} the family promotes" if pool else "")
    return CausalCheck(
        family, described, refs, [f"L{layer}.H{h}" for h in control], len(clean), _estimate(clean, seed),
        _estimate(runs["ablated"], seed), _estimate(runs["control"], seed), _estimate(runs["restored"], seed),
        _estimate(clean - runs["ablated"], seed), _estimate(clean - runs["control"], seed), list(also_ablate),
    )
