"""Head families: find induction, previous-token, sink, successor, name-mover, arithmetic and thematic-anchor heads
among the heads of a Lorsa module, or among a layer's MHSA heads, on probes built offline from the host's tokenizer.

Every family is a probe (prompts, the query positions that count, for each the source positions the family attends
to, and for some the token it should promote) and one score per head in [0, 1]:

    score = sum_q w_q * mass_q * promote_q / sum_q w_q

- mass_q: the share of the head's attention-weighted input at query q that comes from the family's sources. For a
  Lorsa head that is its z-pattern (attention of its QK group times its value at each source; positive parts),
  since a Lorsa head's attention is shared by its QK group and only its value says what it reads; for an MHSA head,
  attention times the norm of what the head writes from each source.
- promote_q: 1 when the family's target token is in the top 1% of the vocabulary by the head's direct logit
  attribution at q, else 0 (families without a target: 1). Chance level is 0.01.
- w_q: a Lorsa head's activation at q (zero where it does not fire; a head that fires at fewer than `MIN_FIRINGS`
  query positions scores 0); 1 for MHSA heads.

A head belongs to a family when its score reaches the family's threshold (`FAMILIES`).

The score without promote_q is reported too (`FamilyScores.attention`): where the head reads from. In the families
whose target is the token at their source (induction, name mover: `Family.copies`), a head that reads from the
sources (attention part >= `ATTENTION_THRESHOLD`) but does not promote the target through the direct logits can
still carry the behaviour through later layers; SmolLM2's layer-18 induction heads do (docs/heads.md). Such heads
are labelled `<family>_attention`.

`ioi_pairs` and `induction_pairs` build the same prompts as clean / corrupted pairs with their metric, for patching and
circuits.
"""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.corpus import special_ids
from lorsa_surgery.host.arch import host_rotary
from lorsa_surgery.interventions.patching import LogitDiff
from lorsa_surgery.lorsa.model import Lorsa, Rotary

MIN_FIRINGS = 4
"""Query positions a Lorsa head must fire at to be scored at all."""
TOP_SHARE = 0.01
"""A target counts as promoted when it is in this top share of the vocabulary by the head's logit effect."""
ATTENTION_THRESHOLD = 0.5
"""Attention part from which a head counts as reading like the family: most of its input comes from the sources."""


@dataclass
class Probe:
    """Prompts and what a family looks for in them."""

    input_ids: torch.Tensor
    """[B, T] token ids, each row opened by BOS."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens."""
    query: torch.Tensor
    """[B, T] bool: the positions that count."""
    sources: torch.Tensor
    """[B, T, T] bool: for each query, the source positions the family attends to."""
    target: torch.Tensor | None = None
    """[B, T] the token the family promotes at each query (-1 where none), or None."""
    contrast: torch.Tensor | None = None
    """[B, T] a token the family should promote less than the target (IOI: the subject), or None."""


@dataclass
class Family:
    """A head family: what it is, its probe, and the score from which a head is labelled with it."""

    name: str
    description: str
    threshold: float
    build: Callable[..., Probe] = field(repr=False)
    copies: bool = False
    """The target is the token at the family's source, so a head that reads from the sources carries the target on
    even where it does not promote it directly: such families also label heads by their attention part."""


# ---- probes -------------------------------------------------------------------------------------------------


def _single_tokens(tokenizer, words: list[str]) -> dict[str, int]:
    """Words (with a leading space) that the tokenizer writes as one token, and that token."""
    out = {}
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False).input_ids
        if len(ids) == 1:
            out[w] = ids[0]
    return out


@functools.lru_cache(maxsize=4)  # decoding a whole vocabulary takes a while; four probes of one detect share it
def word_tokens(tokenizer, n: int = 4000) -> list[int]:
    """Token ids of whole lowercase words with a leading space (at least three letters): material for random text."""
    found = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if len(text) >= 4 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            found.append(token)
            if len(found) >= n:
                break
    if len(found) < 100:
        raise LorsaSurgeryError("The tokenizer has too few whole-word tokens to build random prompts from.")
    return found


def _start(tokenizer) -> int:
    return special_ids(tokenizer)[0]


def _pack(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def _probe(rows: list[list[int]], marks: list[list[tuple[int, list[int], int]]], tokenizer, with_target: bool) -> Probe:
    """marks: per row, (query position, its source positions, target token or -1)."""
    ids, mask = _pack(rows, _start(tokenizer))
    B, T = ids.shape
    query = torch.zeros(B, T, dtype=torch.bool)
    sources = torch.zeros(B, T, T, dtype=torch.bool)
    target = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(marks):
        for q, srcs, tok in row:
            query[b, q] = True
            sources[b, q, srcs] = True
            target[b, q] = tok
    return Probe(ids, mask, query, sources, target if with_target else None)


def random_probe(tokenizer, n: int, length: int, seed: int, kind: str, words: list[int] | None = None) -> Probe:
    """Random word sequences (from `words`, default `word_tokens`): previous-token (source t-1) and sink (source 0)
    probes."""
    rng = random.Random(seed)
    words = words or word_tokens(tokenizer)
    rows, marks = [], []
    for _ in range(n):
        rows.append([_start(tokenizer)] + rng.choices(words, k=length))
        first = 4 if kind == "sink" else 2
        marks.append([(t, [0] if kind == "sink" else [t - 1], -1) for t in range(first, length + 1)])
    return _probe(rows, marks, tokenizer, with_target=False)


def repeated_probe(tokenizer, n: int, length: int, seed: int, kind: str, words: list[int] | None = None) -> Probe:
    """A random word sequence written twice. In the second copy, at position t (token x_t = x_{t-L}): duplicate-token
    heads attend to t-L; induction heads attend to t-L+1, the token that followed last time, and promote it."""
    rng = random.Random(seed)
    words = words or word_tokens(tokenizer)
    rows, marks = [], []
    for _ in range(n):
        seq = rng.sample(words, length)
        row = [_start(tokenizer)] + seq + seq
        rows.append(row)
        second = range(length + 1, 2 * length) if kind == "induction" else range(length + 1, 2 * length + 1)
        if kind == "induction":
            marks.append([(t, [t - length + 1], row[t + 1]) for t in second])
        else:
            marks.append([(t, [t - length], -1) for t in second])
    return _probe(rows, marks, tokenizer, with_target=kind == "induction")


def ioi_pairs(tokenizer, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, LogitDiff]:
    """n clean IOI prompts [n, T], their corruptions (the subject's second mention replaced by the indirect object),
    and the metric: logit of the indirect object minus the subject's, each read from its first mention's column."""
    rng = random.Random(seed)
    token = lambda word: tokenizer(" " + word, add_special_tokens=False).input_ids
    names, places, objects = ([w for w in words if len(token(w)) == 1] for words in (NAMES, PLACES, OBJECTS))
    start = _start(tokenizer)
    text = lambda a, b, fill: [start] + tokenizer(IOI_TEMPLATES[0].format(a=a, b=b, **fill), add_special_tokens=False).input_ids
    clean, corrupt, columns = [], [], set()
    for _ in range(n):
        a, b = rng.sample(names, 2)
        fill = {"place": rng.choice(places), "object": rng.choice(objects)}
        row = text(a, b, fill)
        second = len(row) - 1 - row[::-1].index(token(b)[0])  # the subject's second mention
        clean.append(row)
        corrupt.append(row[:second] + token(a) + row[second + 1 :])
        columns.add((row.index(token(a)[0]), row.index(token(b)[0])))
    [(good, bad)] = columns  # one template: the names sit in the same columns of every row
    return torch.tensor(clean), torch.tensor(corrupt), LogitDiff(good, bad, columns=True)


def induction_pairs(tokenizer, n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of a start token and `length` random words written twice [n, 2 length + 1], and the same rows with the
    first copy replaced by other words."""
    clean = repeated_probe(tokenizer, n, length, seed, "induction").input_ids
    rng = random.Random(seed + 1)
    words = word_tokens(tokenizer)
    corrupt = clean.clone()
    for row in corrupt:
        used = set(row.tolist())
        row[1 : length + 1] = torch.tensor(rng.sample([w for w in words if w not in used], length))
    return clean, corrupt


ORDINALS = [
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
     "December"],
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"],
    list(string.ascii_uppercase),
]


def successor_probe(tokenizer, n: int, seed: int) -> Probe:
    """Runs of an ordinal sequence (days, months, number words, ordinals, letters), comma-separated. At each comma
    (where the next item is predicted) the sources are the items so far; the target is the next item."""
    rng = random.Random(seed)
    comma = tokenizer(",", add_special_tokens=False).input_ids
    lists = [[tok for tok in _single_tokens(tokenizer, seq).values()] for seq in ORDINALS]
    lists = [seq for seq in lists if len(seq) >= 6]
    if not lists:
        raise LorsaSurgeryError("The tokenizer writes no ordinal sequence as single tokens.")
    rows, marks = [], []
    for i in range(n):
        seq = lists[i % len(lists)]
        first = rng.randrange(0, len(seq) - 5)
        items = seq[first : first + rng.randint(5, len(seq) - first)]
        row, at = [_start(tokenizer)], []
        for tok in items:
            at.append(len(row))
            row += [tok] + comma
        rows.append(row)
        marks.append([(at[j + 1] - 1, at[: j + 1], items[j + 1]) for j in range(len(items) - 1)])
    return _probe(rows, marks, tokenizer, with_target=True)


NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James", "Laura", "Michael", "Anna", "Tom", "Kate",
         "Paul", "Lisa", "Mark", "Julia", "Peter", "Rachel", "Daniel"]
PLACES = ["store", "park", "school", "beach", "market", "library", "station", "garden"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "ticket", "map"]
IOI_TEMPLATES = [
    "When {a} and {b} went to the {place}, {b} gave a {object} to",
    "Then, {a} and {b} had a long argument. Afterwards {b} said to",
    "After {a} and {b} arrived at the {place}, {b} handed the {object} to",
    "While {a} and {b} were working at the {place}, {b} gave a {object} to",
]


def ioi_probe(tokenizer, n: int, seed: int) -> Probe:
    """Indirect-object prompts ("When Mary and John went to the store, John gave a drink to"): at the last token,
    name movers attend to the indirect object (Mary) and promote it."""
    rng = random.Random(seed)
    names = _single_tokens(tokenizer, NAMES)
    if len(names) < 4:
        raise LorsaSurgeryError("The tokenizer writes too few names as single tokens for IOI prompts.")
    rows, marks, subjects = [], [], []
    for i in range(n):
        a, b = rng.sample(sorted(names), 2)
        text = IOI_TEMPLATES[i % len(IOI_TEMPLATES)].format(a=a, b=b, place=rng.choice(PLACES), object=rng.choice(OBJECTS))
        row = [_start(tokenizer)] + tokenizer(text, add_special_tokens=False).input_ids
        io = row.index(names[a])
        rows.append(row)
        marks.append([(len(row) - 1, [io], names[a])])
        subjects.append(names[b])
    probe = _probe(rows, marks, tokenizer, with_target=True)
    probe.contrast = torch.where(probe.query, torch.tensor(subjects)[:, None], torch.full_like(probe.target, -1))
    return probe


def arithmetic_probe(tokenizer, n: int, seed: int) -> Probe:
    """Small sums and differences ("23+45="): at the last token the sources are the operands' tokens and the
    target is the result's first token."""
    rng = random.Random(seed)
    rows, marks = [], []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 39)
        op = rng.choice("+-")
        a, b = (a, b) if op == "+" or a >= b else (b, a)
        prompt = tokenizer(f"{a}{op}{b}=", add_special_tokens=False).input_ids
        full = tokenizer(f"{a}{op}{b}={a + b if op == '+' else a - b}", add_special_tokens=False).input_ids
        if full[: len(prompt)] != prompt:
            continue
        row = [_start(tokenizer)] + prompt
        ops = [i + 1 for i, tok in enumerate(prompt) if tokenizer.decode([tok]).strip().isdigit()]
        rows.append(row)
        marks.append([(len(row) - 1, ops, full[len(prompt)])])
    if not rows:
        raise LorsaSurgeryError("The tokenizer splits arithmetic prompts in a way this probe cannot use.")
    return _probe(rows, marks, tokenizer, with_target=True)


def thematic_probe(tokenizer, n: int, seed: int, min_gap: int = 32, length: int = 256) -> Probe:
    """Documents of the built-in prose sample: where the next token is a topic word of the document (a word token it
    uses three times or more) seen more than `min_gap` tokens back, the sources are the earlier occurrences of topic
    words that far back, and the target is that next token."""
    from lorsa_surgery.host import corpus

    docs = corpus.prose()
    rows, marks = [], []
    for doc in docs:  # all of them: few positions per document count
        row = [_start(tokenizer)] + tokenizer(doc, add_special_tokens=False).input_ids[: length - 1]
        counts: dict[int, int] = {}
        for tok in row:
            counts[tok] = counts.get(tok, 0) + 1
        topic = {tok for tok, c in counts.items() if c >= 3 and len(tokenizer.decode([tok]).strip()) >= 4
                 and tokenizer.decode([tok]).strip().isalpha()}
        row_marks = []
        for t in range(min_gap + 8, len(row) - 1):
            if row[t + 1] in topic and row[t + 1] in row[: t - min_gap]:
                srcs = [s for s in range(1, t - min_gap) if row[s] in topic]
                row_marks.append((t, srcs, row[t + 1]))
        if row_marks:
            rows.append(row)
            marks.append(row_marks)
    return _probe(rows, marks, tokenizer, with_target=True)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("previous_token", "attends to the token just before", 0.5,
           lambda tok, n, seed: random_probe(tok, n, 40, seed, "previous")),
    Family("duplicate_token", "attends to the earlier occurrence of the current token", 0.3,
           lambda tok, n, seed: repeated_probe(tok, n, 20, seed, "duplicate")),
    Family("induction", "attends to the token after the earlier occurrence of the current token and promotes it", 0.2,
           lambda tok, n, seed: repeated_probe(tok, n, 20, seed, "induction"), copies=True),
    Family("attention_sink", "puts its attention on the first token (BOS)", 0.7,
           lambda tok, n, seed: random_probe(tok, n, 40, seed, "sink")),
    Family("successor", "promotes the next item of an ordinal sequence it attends to", 0.2, successor_probe),
    # One query per prompt: four times the prompts.
    Family("name_mover", "attends to the indirect object of an IOI prompt and promotes it", 0.2,
           lambda tok, n, seed: ioi_probe(tok, 4 * n, seed), copies=True),
    Family("arithmetic", "attends to the operands of a small sum and promotes the result's first digit", 0.2,
           lambda tok, n, seed: arithmetic_probe(tok, 4 * n, seed)),
    Family("thematic_anchor", "draws on topic words far back in a document and promotes topic words", 0.2,
           thematic_probe),
)}


# ---- scoring -----------------------------------------------------------------------------------------------------


def _top_cut(logits: torch.Tensor) -> torch.Tensor:
    """The smallest logit [...] still in the top TOP_SHARE of logits [..., V]."""
    return logits.topk(max(1, round(TOP_SHARE * logits.shape[-1])), dim=-1).values[..., -1]


def _promoted(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 where target [...] is in the top TOP_SHARE of logits [..., V]."""
    return (logits.gather(-1, target.clamp_min(0)[..., None])[..., 0] >= _top_cut(logits)).float()


@dataclass
class FamilyScores:
    """Every head's score for one family."""

    family: str
    threshold: float
    scores: torch.Tensor
    """[heads] in [0, 1]."""
    attention: torch.Tensor
    """[heads] in [0, 1]: the score without the promotion test, the weighted share of the head's input that comes
    from the family's sources (equal to the score for families without a target)."""
    counted: torch.Tensor
    """[heads] query positions that counted (where a Lorsa head fired; all of them for MHSA heads)."""
    queries: int
    """Query positions in the probe."""

    def members(self) -> list[int]:
        """Heads at or above the threshold, best first."""
        order = self.scores.argsort(descending=True)
        return [int(h) for h in order if self.scores[h] >= self.threshold]

    def attending(self) -> list[int]:
        """Heads whose attention part reaches ATTENTION_THRESHOLD but whose score stays under the threshold, best
        first: they read the family's target without promoting it directly. Empty unless the family copies what it
        attends to (`Family.copies`)."""
        if not FAMILIES[self.family].copies:
            return []
        order = self.attention.argsort(descending=True)
        return [int(h) for h in order if self.attention[h] >= ATTENTION_THRESHOLD and self.scores[h] < self.threshold]


@torch.no_grad()
def score_heads(lorsa: Lorsa, x: torch.Tensor, probe: Probe, logits: Callable[[torch.Tensor], torch.Tensor],
                chunk: int = 256, rotary: Rotary | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, attention parts, counted) of every head of a Lorsa module on a probe, given the module's input
    x [B, T, d] on the probe's prompts, the direct-logit map (`analysis.unembedding`) and, for rotary types the
    module does not compute, the host's (cos, sin) at the probe's positions (`host.arch.host_rotary`)."""
    device = lorsa.W_Q.device
    x, mask = x.to(device, lorsa.W_Q.dtype), probe.attention_mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    query, sources = probe.query.to(device), probe.sources.to(device)
    acts = lorsa.encode(x, pos, mask, rotary=rotary).float()  # [B, T, n]
    effects = logits(lorsa.W_O).to(device) if probe.target is not None else None  # [n, V]
    scores, attention, counted = [], [], []
    for start in range(0, lorsa.cfg.n_ov_heads, chunk):
        heads = torch.arange(start, min(start + chunk, lorsa.cfg.n_ov_heads), device=device)
        parts = lorsa.z_pattern(x, heads, pos, mask, rotary).float().clamp_min(0)  # [B, h, T, S]
        mass = (parts * sources[:, None]).sum(-1) / parts.sum(-1).clamp_min(1e-12)  # [B, h, T]
        weight = acts[..., heads].permute(0, 2, 1) * query[:, None]  # [B, h, T]
        promote = torch.ones_like(mass)
        if effects is not None:
            effect = effects[heads]  # [h, V]: a Lorsa head promotes the same tokens wherever it fires
            promote = (effect[:, probe.target.to(device).clamp_min(0)] >= _top_cut(effect)[:, None, None]).float()
            promote = promote.permute(1, 0, 2)
        fired = (weight > 0).sum((0, 2))
        for out, part in ((scores, mass * promote), (attention, mass)):
            score = (weight * part).sum((0, 2)) / weight.sum((0, 2)).clamp_min(1e-12)
            out.append(torch.where(fired >= MIN_FIRINGS, score, torch.zeros_like(score)))
        counted.append(fired)
    return torch.cat(scores).cpu(), torch.cat(attention).cpu(), torch.cat(counted).cpu()


@torch.no_grad()
def score_attention_heads(model: nn.Module, layer: int, probe: Probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, attention parts, counted) of every MHSA head of a host layer on a probe, read through its exact copy."""
    from lorsa_surgery.analysis.attribution import unembedding
    from lorsa_surgery.host.arch import exact_copy

    x, mask, pos = _layer_input(model, layer, probe)
    exact = exact_copy(model, layer).to(x.device)
    H, hd, d = exact.cfg.n_qk_heads, exact.cfg.d_qk_head, exact.cfg.d_model
    query, sources = probe.query.to(x.device), probe.sources.to(x.device)
    pattern = exact.attention_pattern(x, pos, mask, host_rotary(model, layer, pos))  # [B, H, T, S]
    w_v, w_o = exact.W_V.view(H, 2, hd, d)[:, 0], exact.W_O.view(H, 2, hd, d)[:, 0]
    values = torch.einsum("bsd,hkd->bhsk", x, w_v) + exact.b_V.view(H, 2, hd)[:, 0][None, :, None]
    written = torch.einsum("bhsk,hkd->bhsd", values, w_o)  # [B, H, S, d]: what each head writes from each source
    parts = pattern * written.norm(dim=-1)[:, :, None, :]
    mass = (parts * sources[:, None]).sum(-1) / parts.sum(-1).clamp_min(1e-12)  # [B, H, T]
    weight = query[:, None].float().expand_as(mass)
    promote = torch.ones_like(mass)
    if probe.target is not None:
        b, t = query.nonzero(as_tuple=True)
        out = torch.einsum("bhts,bhsd->bhtd", pattern, written)[b, :, t]  # [Q, H, d]
        target = probe.target.to(x.device)[b, t][:, None].expand(-1, H)
        promote[b, :, t] = _promoted(unembedding(model)(out).to(x.device), target)
    total = weight.sum((0, 2)).clamp_min(1e-12)
    score, attention = (weight * mass * promote).sum((0, 2)) / total, (weight * mass).sum((0, 2)) / total
    return score.cpu(), attention.cpu(), weight.sum((0, 2)).long().cpu()


def _layer_input(model: nn.Module, layer: int, probe: Probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lorsa_surgery.host.placement import input_device
    from lorsa_surgery.training.trainer import capture

    device = input_device(model)
    ids, mask = probe.input_ids.to(device), probe.attention_mask.to(device)
    x, _ = capture(model, layer, ids, mask)
    return x.float(), mask, (mask.cumsum(-1) - 1).clamp_min(0)


def detect(model: nn.Module, tokenizer, layer: int, lorsa: Lorsa | None = None, families: list[str] | None = None,
           n_prompts: int = 16, seed: int = 0) -> dict[str, FamilyScores]:
    """Score every head of `lorsa` (every MHSA head of `layer` when None) for each family (default: all)."""
    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise LorsaSurgeryError(f"Unknown head families: {', '.join(unknown)} (known: {', '.join(FAMILIES)}).")
    result = {}
    for name in names:
        family = FAMILIES[name]
        probe = family.build(tokenizer, n_prompts, seed)
        if lorsa is None:
            scores, attention, counted = score_attention_heads(model, layer, probe)
        else:
            from lorsa_surgery.analysis.attribution import unembedding

            x, _, pos = _layer_input(model, layer, probe)
            scores, attention, counted = score_heads(lorsa.to(x.device), x, probe, unembedding(model),
                                                     rotary=host_rotary(model, layer, pos))
        result[name] = FamilyScores(name, family.threshold, scores, attention, counted, int(probe.query.sum()))
    return result


def catalog_entries(results: dict[str, FamilyScores]) -> dict[int, dict[str, str]]:
    """Head catalog entries for the heads that reach a family's threshold: the label is the family whose threshold
    the head exceeds most (score / threshold), the note lists every family it belongs to with its score. A head in no
    family that reads like one (`FamilyScores.attending`) is labelled `<family>_attention`, by the same rule on the
    attention parts."""
    members = _entries([(name, h, float(fs.scores[h]) / fs.threshold, f"{name} {float(fs.scores[h]):.2f}")
                        for name, fs in results.items() for h in fs.members()])
    readers = _entries([(f"{name}_attention", h, float(fs.attention[h]) / ATTENTION_THRESHOLD,
                         f"{name} attention {float(fs.attention[h]):.2f} (score {float(fs.scores[h]):.2f})")
                        for name, fs in results.items() for h in fs.attending() if h not in members])
    return {**members, **readers}


def _entries(found: list[tuple[str, int, float, str]]) -> dict[int, dict[str, str]]:
    """(label, head, strength, note part) -> one entry per head, labelled by its strongest find, noting all."""
    entries: dict[int, dict[str, str]] = {}
    best: dict[int, float] = {}
    for label, head, strength, part in found:
        if head in entries:
            entries[head]["note"] += "; " + part
        else:
            entries[head] = {"label": label, "note": "detected: " + part}
        if strength > best.get(head, 0.0):
            best[head] = strength
            entries[head]["label"] = label
    return entries
