"""One scan of a corpus through a spliced layer, kept on disk, and every view of the heads read from it.

`scan` runs the corpus through the host up to the layer (no further: later layers cannot change what its heads do)
and keeps every non-zero activation of the scanned heads, sparse. From those it picks, per head, the strongest
examples and examples across the quantiles of its activations, and runs the corpus a second time over just their
windows to record, at each example token, the QK group's attention row and the per-source contributions to the
head's pre-activation (the z-pattern). Direct logit attribution of every head is stored too. The store is a folder
(`save` / `load`) with a key naming the host, the module and the corpus: `ensure` rescans only when one changes.

Views: `rows` (the table of `heads list` and the index page), `histogram`, `examples`; `lorsa_surgery.analysis.pages` renders
the index and head pages from a store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lorsa_surgery.analysis.attribution import logit_scores
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.hooks import run_with_cache
from lorsa_surgery.host.splicing import Splice
from lorsa_surgery.interventions.edits import splice_of
from lorsa_surgery.interventions.heads import HeadRef, HeadSpec, by_layer, head_name, resolve_heads
from lorsa_surgery.io import files

STORE_VERSION = 1
EXAMPLE_KINDS = ("top", "quantile")


@dataclass
class HeadStore:
    """What one scan saw at one layer: windows, sparse activations, chosen examples and their patterns, and DLA."""

    layer: int
    """The spliced layer scanned."""
    heads: torch.Tensor
    """[H] indices of the heads scanned; "column" below means a position in this list."""
    names: list[str]
    """Display name of each column (`L3.H5 (induction)`)."""
    labels: list[str]
    """Catalog label of each column ("" when none)."""
    notes: list[str]
    """Catalog note of each column."""
    n_heads: int
    """OV heads of the module (the scan may cover fewer)."""
    group_size: int
    """OV heads per QK head: column c's QK group is heads[c] // group_size."""
    top_k: int
    """Heads that fire per token (the module's K; 0 if not top-K)."""
    tokens: torch.Tensor
    """[N, W] token ids of the windows, -1 past each window's end."""
    window_doc: torch.Tensor
    """[N] document index of each window."""
    window_start: torch.Tensor
    """[N] offset of each window's first token in its document (0: the window starts the document)."""
    entry_window: torch.Tensor
    """[E] window of each non-zero activation."""
    entry_position: torch.Tensor
    """[E] position in the window."""
    entry_column: torch.Tensor
    """[E] column (head)."""
    entry_value: torch.Tensor
    """[E] the activation."""
    example_column: torch.Tensor
    """[X] column of each chosen example."""
    example_kind: torch.Tensor
    """[X] 0: one of the head's strongest; q >= 1: from quantile band q of its activations (1 lowest)."""
    example_window: torch.Tensor
    """[X] window of the example."""
    example_position: torch.Tensor
    """[X] position of the example token in its window."""
    example_value: torch.Tensor
    """[X] the activation there."""
    example_attention: torch.Tensor
    """[X, W] the QK group's attention row at the example token (zero past it)."""
    example_contributions: torch.Tensor
    """[X, W] per-source contributions to the head's pre-activation there (they sum to it)."""
    dla_tokens: torch.Tensor
    """[H, 2, n] token ids the head's output direction promotes most (row 0) and suppresses most (row 1)."""
    dla_values: torch.Tensor
    """[H, 2, n] their logit change per unit of activation."""
    key: str = ""
    """What was scanned (host, module, corpus, settings), hashed: a store with another key is stale."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How the scan was made (window length, examples per head, quantile bands, corpus)."""

    # ---- files

    def save(self, folder: str | Path) -> Path:
        """Write the store as one folder swapped in whole: a rescan killed at any point leaves the old store or the
        new one, never the old key over new tensors."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in tensors}
        with files.new_folder(folder, overwrite=True, kind="head-store") as staging:
            files.write_safetensors(staging / "store.safetensors", tensors)
            files.write_json(staging / "store.json", {"version": STORE_VERSION, **meta})
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "HeadStore":
        folder = Path(folder)
        meta = files.read_json(folder / "store.json", expect=dict)
        if meta.pop("version", None) != STORE_VERSION:
            raise LorsaSurgeryError(f"{folder} holds a head scan of another format; scan again.")
        tensors = files.read_safetensors(folder / "store.safetensors")
        try:
            return cls(**meta, **tensors)
        except TypeError:
            raise LorsaSurgeryError(f"{folder} holds a head scan with other fields than this version writes; scan again.") from None

    # ---- views

    @property
    def n_tokens(self) -> int:
        return int((self.tokens >= 0).sum())

    def column(self, head: int | str | HeadRef) -> int:
        """The column of a head given by index, `L3.H5` or HeadRef."""
        index = HeadRef.parse(head).index if isinstance(head, str) else getattr(head, "index", head)
        if isinstance(head, (str, HeadRef)) and HeadRef.parse(str(head)).layer != self.layer:
            raise LorsaSurgeryError(f"{head} is not at layer {self.layer}, which this scan covers.")
        hits = (self.heads == index).nonzero()
        if not len(hits):
            raise LorsaSurgeryError(f"Head L{self.layer}.H{index} was not scanned (the scan covers {len(self.heads)} heads).")
        return int(hits[0])

    def rows(self) -> list[dict[str, Any]]:
        """Per head: ref, name, label, firing count and rate, mean activation (zeros included and when firing), max,
        dead flag (never fired), QK group and the tokens it promotes most."""
        H = len(self.heads)
        column = self.entry_column.long()
        fired = torch.bincount(column, minlength=H)
        total = torch.zeros(H, dtype=torch.float64).index_add_(0, column, self.entry_value.double())
        peak = torch.zeros(H).scatter_reduce_(0, column, self.entry_value, "amax", include_self=True)
        n = self.n_tokens
        return [
            {"head": f"L{self.layer}.H{int(h)}", "index": int(h), "name": self.names[c], "label": self.labels[c],
             "note": self.notes[c], "fired": int(fired[c]), "firing_rate": int(fired[c]) / max(n, 1),
             "mean": float(total[c]) / max(n, 1), "mean_when_fired": float(total[c]) / max(int(fired[c]), 1),
             "max": float(peak[c]), "dead": int(fired[c]) == 0, "qk_group": int(h) // self.group_size,
             "promoted": self.dla_tokens[c, 0].tolist()}
            for c, h in enumerate(self.heads.tolist())
        ]

    def activations(self, column: int) -> torch.Tensor:
        """The head's non-zero activations over the corpus."""
        if getattr(self, "_by_column", None) is None:  # sorted by head once: a mask per head is slow for thousands
            order = torch.sort(self.entry_column, stable=True).indices
            counts = torch.bincount(self.entry_column.long(), minlength=len(self.heads)).tolist()
            self._by_column = torch.split(self.entry_value[order], counts)
        return self._by_column[column]

    def activations_at(self, column: int) -> dict[tuple[int, int], float]:
        """(window, position) -> the head's activation there, where it fired."""
        mine = self.entry_column == column
        return {(w, t): v for w, t, v in zip(self.entry_window[mine].tolist(), self.entry_position[mine].tolist(),
                                             self.entry_value[mine].tolist())}

    def histogram(self, column: int, bins: int = 30) -> tuple[list[float], list[int]]:
        """(bin edges, counts) of the head's non-zero activations."""
        values = self.activations(column)
        if not len(values):
            return [], []
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        counts = torch.histc(values, bins=bins, min=lo, max=hi)
        step = (hi - lo) / bins
        return [lo + i * step for i in range(bins + 1)], [int(c) for c in counts]

    def examples(self, column: int) -> list[dict[str, Any]]:
        """The head's examples, strongest first then by quantile band: kind, value, window, position, document,
        offset in it, attention row and contributions."""
        picked = (self.example_column == column).nonzero()[:, 0].tolist()
        return [
            {"kind": int(self.example_kind[i]), "value": float(self.example_value[i]), "window": int(self.example_window[i]),
             "position": int(self.example_position[i]), "doc": int(self.window_doc[self.example_window[i]]),
             "offset": int(self.window_start[self.example_window[i]]) + int(self.example_position[i]),
             "attention": self.example_attention[i].float(), "contributions": self.example_contributions[i].float()}
            for i in picked
        ]

    def window(self, w: int) -> torch.Tensor:
        ids = self.tokens[w]
        return ids[ids >= 0]


# ---- scanning -------------------------------------------------------------------------------------------------------


def corpus_windows(tokenizer, texts=(), max_length: int = 128, max_tokens: int = 65536, seed: int = 0):
    """(doc, start, ids) windows aligned to document starts, from documents taken in a seeded order until
    max_tokens: of the text files given, else of the built-in offline corpus (the Python documentation), so a scan
    sees many kinds of text rather than the first documents only."""
    from lorsa_surgery.host import corpus
    from lorsa_surgery.host.metrics import document_windows

    docs = corpus.load_texts(list(texts)) if texts else corpus.python_documentation()
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, total = [], 0
    for doc, start, ids in document_windows(tokenizer, [docs[i] for i in order], max_length):
        if total >= max_tokens:
            break
        picked.append((order[doc], start, ids))
        total += len(ids)
    return picked


def _batches(windows: list[tuple[int, int, torch.Tensor]], rows: list[int], batch_size: int):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        W = max(len(windows[r][2]) for r in chunk)
        ids = torch.zeros(len(chunk), W, dtype=torch.long)
        mask = torch.zeros(len(chunk), W, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(windows[r][2])
            ids[i, :n], mask[i, :n] = windows[r][2], 1
        yield chunk, ids, mask


def _pick_examples(store_columns: torch.Tensor, values: torch.Tensor, H: int, k: int, bands: int, per_band: int):
    """Indices into the entries: per column its k largest (kind 0) and `per_band` evenly spaced from each of `bands`
    quantile bands of its values (kind 1..bands), without repeats."""
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(store_columns[order], stable=True).indices]  # by column, strongest first within
    counts = torch.bincount(store_columns, minlength=H).tolist()
    picked, kinds, start = [], [], 0
    for c in range(H):
        n = counts[c]
        mine = order[start : start + n]
        start += n
        chosen = {int(i): 0 for i in mine[:k]}
        for band in range(bands):
            lo, hi = n * band // bands, n * (band + 1) // bands  # ascending band `band`: mine is descending
            for j in range(per_band):
                if hi > lo:
                    index = int(mine[n - 1 - (lo + (hi - lo) * (2 * j + 1) // (2 * per_band))])
                    chosen.setdefault(index, band + 1)
        picked += list(chosen)
        kinds += list(chosen.values())
    return torch.tensor(picked, dtype=torch.long), torch.tensor(kinds, dtype=torch.long)


@torch.no_grad()
def scan(
    handle: Splice,
    windows: list[tuple[int, int, torch.Tensor]],
    layer: int,
    heads: list[int] | None = None,
    *,
    k: int = 10,
    bands: int = 5,
    per_band: int = 2,
    n_logits: int = 10,
    batch_size: int = 8,
    progress: bool = True,
    key: str = "",
    settings: dict[str, Any] | None = None,
) -> HeadStore:
    """Scan document windows ((doc, start, ids) from `metrics.document_windows`) through spliced `layer` for
    `heads` (default all). Active interventions shape the scan as they shape any run."""
    from tqdm.auto import tqdm

    site = handle[layer]
    lorsa = site.source
    heads = list(range(lorsa.cfg.n_ov_heads)) if heads is None else list(heads)
    if not windows:
        raise LorsaSurgeryError("No windows to scan.")
    cols = torch.tensor(heads)
    H, N, W = len(heads), len(windows), max(len(w[2]) for w in windows)
    point = f"L{layer}.hook_acts"

    entries = []
    for chunk, ids, mask in tqdm(list(_batches(windows, list(range(N)), batch_size)), desc=f"scan L{layer}", disable=not progress):
        acts = run_with_cache(handle, ids, [point], attention_mask=mask, stop=True)[point]
        acts = acts[..., cols.to(acts.device)].float().cpu() * mask[..., None]
        b, t, c = acts.nonzero(as_tuple=True)
        entries.append(torch.stack([torch.tensor(chunk)[b], t, c]).T)
        entries.append(acts[b, t, c][:, None])
    where = torch.cat(entries[0::2]) if entries else torch.zeros(0, 3, dtype=torch.long)
    values = torch.cat(entries[1::2])[:, 0] if entries else torch.zeros(0)

    picked, kinds = _pick_examples(where[:, 2], values, H, k, bands, per_band)
    ex = where[picked]
    attention = torch.zeros(len(picked), W)
    contributions = torch.zeros(len(picked), W)
    g = lorsa.cfg.group_size
    needed = sorted(set(ex[:, 0].tolist()))
    by_window: dict[int, list[int]] = {}
    for i, w in enumerate(ex[:, 0].tolist()):
        by_window.setdefault(w, []).append(i)
    points = [f"L{layer}.hook_pattern", f"L{layer}.hook_v"]
    for chunk, ids, mask in tqdm(list(_batches(windows, needed, batch_size)), desc=f"patterns L{layer}", disable=not progress):
        pattern, v = (run_with_cache(handle, ids, points, attention_mask=mask, stop=True)[p] for p in points)
        for row, w in enumerate(chunk):
            n = int(mask[row].sum())
            for i in by_window[w]:
                head, t = heads[int(ex[i, 2])], int(ex[i, 1])
                attention[i, :n] = pattern[row, head // g, t, :n].float().cpu()
                contributions[i, :n] = attention[i, :n] * v[row, :n, head].float().cpu()

    up_ids, up_values, down_ids, down_values = [], [], [], []
    for start in range(0, H, 128):  # [128, vocab] at a time
        scores = logit_scores(handle, layer, heads[start : start + 128])
        up, down = scores.topk(n_logits, dim=-1), (-scores).topk(n_logits, dim=-1)
        up_ids.append(up.indices), up_values.append(up.values), down_ids.append(down.indices), down_values.append(-down.values)
    tokens = torch.full((N, W), -1, dtype=torch.long)
    for i, (_, _, ids) in enumerate(windows):
        tokens[i, : len(ids)] = ids
    catalog = lorsa.catalog
    return HeadStore(
        layer=layer, heads=cols, names=[head_name(HeadRef(layer, h), handle) for h in heads],
        labels=[catalog.get(h, {}).get("label", "") for h in heads], notes=[catalog.get(h, {}).get("note", "") for h in heads],
        n_heads=lorsa.cfg.n_ov_heads, group_size=g, top_k=lorsa.cfg.top_k if lorsa.cfg.act_fn == "topk" else 0, tokens=tokens,
        window_doc=torch.tensor([w[0] for w in windows]), window_start=torch.tensor([w[1] for w in windows]),
        # int32 indices and float16 patterns: a scan of 65k tokens through 1152 heads stays near 40 MB on disk.
        entry_window=where[:, 0].int(), entry_position=where[:, 1].int(), entry_column=where[:, 2].int(),
        entry_value=values.contiguous(), example_column=ex[:, 2].int(), example_kind=kinds.int(),
        example_window=ex[:, 0].int(), example_position=ex[:, 1].int(), example_value=values[picked].contiguous(),
        example_attention=attention.half(), example_contributions=contributions.half(),
        dla_tokens=torch.stack([torch.cat(up_ids), torch.cat(down_ids)], 1).cpu(),
        dla_values=torch.stack([torch.cat(up_values), torch.cat(down_values)], 1).float().cpu(),
        key=key, settings={"k": k, "bands": bands, "per_band": per_band, **(settings or {})},
    )


def scan_key(handle: Splice, layer: int, windows: list[tuple[int, int, torch.Tensor]], settings: dict[str, Any]) -> str:
    """A hash of what a scan depends on: the host's record, the module's weights and catalog, the windows, the settings."""
    digest = hashlib.sha256()
    from lorsa_surgery.host.models import public_record

    digest.update(json.dumps({"host": public_record(handle.base or {}), "settings": settings}, sort_keys=True).encode())
    lorsa = handle[layer].source
    digest.update(json.dumps({"cfg": lorsa.cfg.to_dict(), "catalog": lorsa.catalog}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(lorsa.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    for doc, start, ids in windows:
        digest.update(f"{doc}:{start}:".encode() + ids.numpy().tobytes())
    return digest.hexdigest()


def ensure(handle: Splice, windows, layer: int, folder: str | Path, *, k: int = 10, bands: int = 5, per_band: int = 2,
           progress: bool = True) -> tuple[HeadStore, bool]:
    """The store in `folder` if it holds this very scan, else a new scan saved there; and whether it was scanned now."""
    folder = Path(folder)
    settings = {"k": k, "bands": bands, "per_band": per_band}
    key = scan_key(handle, layer, windows, settings)
    if (folder / "store.json").is_file():
        try:
            store = HeadStore.load(folder)
        except LorsaSurgeryError:
            store = None
        if store is not None and store.key == key:
            return store, False
    store = scan(handle, windows, layer, key=key, settings=settings, progress=progress, **settings)
    store.save(folder)
    return store, True


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
    """Run token windows (1-D or [1, T] tensors, e.g. from `lorsa_surgery.host.metrics.token_windows`) through the model and
    collect, per head, firing statistics and the k strongest activations with `context` = (before, after) tokens
    (`lorsa_surgery.analysis.scan.scan`, one scan per layer; its store holds more: see `heads scan`)."""

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
