"""A head scan exported in formats others render: Neuronpedia's import bundle and HeadVis's data tree.

Neuronpedia (`format="neuronpedia"`): per scanned layer, the folder its importer reads
(hijohnnylin/neuronpedia, apps/webapp/app/api/admin/import/route.ts and lib/db/import.ts), at
`<model id>/<layer>-<source set>/`: `release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl`, and gzipped
JSON Lines of `features/` (one Lorsa feature per head, index = head index), `activations/` (the scan's examples of
each head, with the z-pattern at the example token) and `explanations/` (catalog labels and notes). Rows carry the
columns of the Prisma models those files fill (apps/webapp/prisma/schema.prisma: SourceRelease, Model, SourceSet,
Source, Neuron, Activation, Explanation). The z-pattern goes in `zIndices` = [target positions, source positions]
with `zValues`, which the importer splits into the `zKIndices` (target) and `zQIndices` (source) columns that its
activation view reads.

HeadVis (`format="headvis"`): the tree Neuronpedia's HeadVis loaders read
(utils/neuronpedia-utils/neuronpedia_utils/headvis/load-head-metrics.py and load-head-sequences.py), at
`<model id>/headvis/<corpus>/`: `config.json`, `scatter_data.json` (the six metrics per head) and
`heads/L{layer}H{head}.json` (sampled sequences with sparse attention by activation interval, the |q-k|
histogram, top query and key tokens, the activation histogram, statistics). A HeadVis head here is a QK group of
the module, which for a scan of an exact copy of the layer's attention (`--lorsa L=from-attention`) is MHSA head
g. Everything is computed from the attention rows the scan kept: the QK group's row at each example token of its
heads, not every query position of the corpus.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from lorsa_surgery.analysis.config import FORMATS, ExportConfig
from lorsa_surgery.analysis.scan import HeadStore
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.io import files

SCAN_RECORD = "scan.json"
"""The record `heads scan` writes beside its layer stores."""

# HeadVis's defaults (compute-head-metrics.py), so a tree of ours reads like theirs.
N_INTERVALS = 5
"""Activation intervals sequences are sampled from (1 lowest)."""
SAMPLES_PER_INTERVAL = 3
"""Sequences kept per interval below the top one, evenly spaced through it."""
SAMPLES_PER_TOP_INTERVAL = 10
"""Sequences kept in the top interval: the strongest."""
TOPK_PER_ROW = 8
"""Attention entries kept per query row of a sequence..."""
ROW_THRESHOLD = 0.005
"""...of at least this weight."""
QK_DISTANCE_EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
"""Bin edges of the |q-k| histogram."""
ACTIVATION_BINS = 50
"""Bins of the histogram of sequences' max attention, over [0, 1]."""
TOP_TOKENS = 50
"""Tokens listed in top query and key tokens."""
INDUCTION_FLOOR = 0.01
"""Attention under this is not counted in the induction score."""
Z_SOURCES = 10
"""Source tokens of an activation's z-pattern kept (the largest contributions)."""


@dataclass
class ScanFolder:
    """What `heads scan --out` wrote: its record, one store per layer, and the tokenizer saved beside them."""

    record: dict[str, Any]
    """The scan's record (model, modules, layers, corpus)."""
    stores: list[HeadStore]
    """One store per scanned layer."""
    tokenizer: Any
    """The scanned model's tokenizer."""


@dataclass
class ExportResult:
    """Where an export went and what it holds."""

    out: Path
    """The folder written."""
    counts: dict[str, int] = field(default_factory=dict)
    """Rows or files of each kind written."""


def read_scan(folder: str | Path, *, tokenizer: bool = True) -> ScanFolder:
    """The record, stores and (unless `tokenizer=False`) tokenizer of a scan folder, wherever it was moved."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorsaSurgeryError(f"{folder} is not a folder; pass the --out folder of `heads scan`.")
    if not (folder / SCAN_RECORD).is_file():
        raise LorsaSurgeryError(f"{folder} holds no {SCAN_RECORD}; pass the --out folder of `heads scan`.")
    record = files.read_json(folder / SCAN_RECORD, expect=dict)
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers or not all(type(layer) is int and layer >= 0 for layer in layers):
        raise LorsaSurgeryError(f"{folder / SCAN_RECORD}: layers should be a list of layer numbers; scan again.")
    stores = [HeadStore.load(folder / f"L{layer}") for layer in layers]
    return ScanFolder(record, stores, scan_tokenizer(folder) if tokenizer else None)


def scan_tokenizer(folder: str | Path):
    """The tokenizer a scan saved beside its stores (found through its record, so a moved scan still finds it)."""
    from transformers import AutoTokenizer

    record = files.read_json(Path(folder) / SCAN_RECORD, expect=dict)
    where = files.inside(folder, record.get("tokenizer", "tokenizer"), what="the scan's tokenizer")
    return AutoTokenizer.from_pretrained(str(where))


def export_scan(scan_dir: str | Path, format: str, out: str | Path, *, overwrite: bool = False,
                config: ExportConfig | None = None) -> ExportResult:
    """Write the scan in `scan_dir` to the folder `out` as a Neuronpedia bundle or a HeadVis tree (module
    docstring). `out` is refused if it holds anything lorsa-surgery did not write, or an earlier result without
    `overwrite`."""
    if format not in FORMATS:
        raise LorsaSurgeryError(f"Unknown export format {format!r}: choose {' or '.join(FORMATS)}.")
    config = config or ExportConfig()
    for name in ("source_set", "release", "creator_id"):
        if not getattr(config, name):
            raise LorsaSurgeryError(f"The export's {name.replace('_', ' ')} cannot be empty.")
    files.check_out(out, overwrite=overwrite)
    scan = read_scan(scan_dir)
    model_id = config.model_id or _site_id(str(scan.record.get("model", "")))
    if not _SITE_ID.fullmatch(model_id):
        raise LorsaSurgeryError(f"Model id {model_id!r} should be letters, digits, - and _ only.")
    host = _host(scan)
    write = _neuronpedia if format == "neuronpedia" else _headvis
    with files.new_folder(out, overwrite=overwrite, kind=f"{format}-export") as staging:
        counts = write(scan, host, staging, model_id, config)
    return ExportResult(Path(out), counts)


_SITE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _site_id(model: str) -> str:
    """A site id from what the scan was given as model: a Hub id's name or a folder's or file's name."""
    name = Path(model).stem if Path(model).suffix == ".gguf" else Path(model).name
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "model"


def _host(scan: ScanFolder) -> tuple[str, int]:
    """(the scanned model as the site should name it, its number of layers) from its config, read without weights."""
    from lorsa_surgery.host.models import load_config

    model = str(scan.record.get("model", ""))
    config = load_config(model, scan.record.get("revision"))
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(layers, int):
        raise LorsaSurgeryError(f"The config of {model!r} gives no number of layers.")
    # A local folder or file is named by its last part: the site has no use for this machine's paths.
    return (Path(model).name if Path(model).exists() else model), layers


def _corpus(scan: ScanFolder) -> str:
    corpus = scan.record.get("corpus", "")
    return ", ".join(corpus) if isinstance(corpus, list) else str(corpus)


def _texts(tokenizer) -> Callable[[int], str]:
    """Token id -> its text as the tokenizer decodes it alone (how both sites store tokens), decoded once."""
    cache: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token])
        return cache[token]

    return text


def _check_finite(values: Iterable[float], what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise LorsaSurgeryError(f"The scan holds a value that is not finite in {what}; scan again.")


def _write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Rows as gzipped JSON Lines (mtime 0: the same scan gives the same bytes); the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n")
            n += 1
    return n


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    files.write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


# ---- Neuronpedia -------------------------------------------------------------------------------------------------


def _trunc(x: float) -> float:
    """Toward zero to 4 decimals, as Neuronpedia's exporters write floats."""
    return math.trunc(float(x) * 1e4) / 1e4


def _truncs(x: torch.Tensor) -> list:
    """`_trunc` of every element (nested lists for a matrix)."""
    return (torch.trunc(x.double() * 1e4) / 1e4).tolist()


def _row_id(*parts: Any) -> str:
    """A cuid-shaped id (a letter, then 24 lower-case letters or digits) fixed by what the row is, so importing the
    same export twice adds nothing (the importer skips rows whose id exists)."""
    return "c" + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]


def _neuronpedia(scan: ScanFolder, host: tuple[str, int], out: Path, model_id: str, config: ExportConfig) -> dict[str, int]:
    model_name, n_layers = host
    text = _texts(scan.tokenizer)
    counts = {"sources": 0, "features": 0, "activations": 0, "explanations": 0}
    creator = {"creatorId": config.creator_id}
    for store in scan.stores:
        source = f"{store.layer}-{config.source_set}"
        folder = out / model_id / source
        _write_jsonl(folder / "release.jsonl", [{
            "name": config.release, "description": f"Lorsa modules spliced by lorsa-surgery into {model_name}",
            "descriptionShort": "Lorsa (lorsa-surgery)", "creatorName": config.creator_name, **creator, "urls": [],
        }])
        _write_jsonl(folder / "model.jsonl", [{
            "id": model_id, "displayName": model_name, "displayNameShort": model_id, **creator, "layers": n_layers,
            "neuronsPerLayer": store.n_heads, "owner": model_name.split("/")[0] if "/" in model_name else model_name,
        }])
        _write_jsonl(folder / "sourceset.jsonl", [{
            "modelId": model_id, "name": config.source_set, "releaseName": config.release, **creator,
            "creatorName": config.creator_name, "urls": [], "hasDashboards": True,
            "description": "Lorsa: sparse attention heads with rank-1 OV circuits, in QK groups sharing one pattern",
        }])
        windows, width = store.tokens.shape
        _write_jsonl(folder / "source.jsonl", [{
            "id": source, "modelId": model_id, "setName": config.source_set, **creator, "hasDashboards": True,
            "dataset": _corpus(scan), "num_prompts": windows, "num_tokens_in_prompt": width,
            "notes": (f"Lorsa module at layer {store.layer}: {store.n_heads} heads in QK groups of {store.group_size}"
                      + (f", top {store.top_k} firing per token" if store.top_k else "")
                      + f"; {len(store.heads)} heads scanned over {store.n_tokens} tokens."),
        }])
        features, activations, explanations = _neuronpedia_rows(store, text, model_id, source, config)
        counts["sources"] += 1
        counts["features"] += _write_jsonl_gz(folder / "features" / "batch-0.jsonl.gz", features)
        counts["activations"] += _write_jsonl_gz(folder / "activations" / "batch-0.jsonl.gz", activations)
        if explanations:
            counts["explanations"] += _write_jsonl_gz(folder / "explanations" / "batch-0.jsonl.gz", explanations)
    return counts


def _neuronpedia_rows(store: HeadStore, text: Callable[[int], str], model_id: str, source: str, config: ExportConfig):
    """(features, activations, explanations) rows of one layer's store."""
    where = {"modelId": model_id, "layer": source}
    rows = store.rows()
    features, explanations = [], []
    for c, row in enumerate(rows):
        edges, heights = store.histogram(c)
        dla_text = [[text(int(t)) for t in side] for side in store.dla_tokens[c].tolist()]
        dla_values = [[_trunc(v) for v in side] for side in store.dla_values[c].tolist()]
        _check_finite([row["max"], *dla_values[0], *dla_values[1]], row["head"])
        features.append({
            **where, "index": str(row["index"]), "sourceSetName": config.source_set, "creatorId": config.creator_id,
            "maxActApprox": _trunc(row["max"]), "frac_nonzero": row["firing_rate"],
            "pos_str": dla_text[0], "pos_values": dla_values[0], "neg_str": dla_text[1], "neg_values": dla_values[1],
            "freq_hist_data_bar_heights": heights,
            "freq_hist_data_bar_values": [_trunc((lo + hi) / 2) for lo, hi in zip(edges, edges[1:])],
        })
        if row["label"]:
            explanations.append({**where, "index": str(row["index"]), "id": _row_id(model_id, source, row["index"], "label"),
                                 "description": row["label"], "notes": row["note"] or None, "authorId": config.creator_id})
    return features, _activation_rows(store, text, where, config), explanations


def _activation_rows(store: HeadStore, text: Callable[[int], str], where: dict[str, str], config: ExportConfig):
    """One Activation row per example of the scan, lazily: a full scan has up to twenty per head."""
    bounds = _band_bounds(store, int(store.settings.get("bands", 0)))
    windows = [[text(t) for t in store.window(w).tolist()] for w in range(len(store.tokens))]
    # The head's activation on every token of each example's window, from the sparse entries.
    N = len(store.tokens)
    entry_key = store.entry_column.long() * N + store.entry_window.long()
    keep = torch.isin(entry_key, store.example_column.long() * N + store.example_window.long())
    dense: dict[int, list[float]] = {}
    for key, t, v in zip(entry_key[keep].tolist(), store.entry_position[keep].tolist(), _truncs(store.entry_value[keep])):
        if key not in dense:
            dense[key] = [0.0] * len(windows[key % N])
        dense[key][t] = v
    contributions = store.example_contributions.float()  # zero past each window's end
    top = contributions.abs().topk(min(Z_SOURCES, contributions.shape[1]), dim=1).indices
    top_values = _truncs(contributions.gather(1, top))
    for i, (sources, z_values) in enumerate(zip(top.tolist(), top_values)):
        c, w, t = int(store.example_column[i]), int(store.example_window[i]), int(store.example_position[i])
        kind, head = int(store.example_kind[i]), int(store.heads[c])
        values = dense.get(c * N + w) or [0.0] * len(windows[w])
        z = sorted((s, v) for s, v in zip(sources, z_values) if v != 0)
        _check_finite(values + z_values, f"the activations of L{store.layer}.H{head}")
        peak = max(range(len(values)), key=values.__getitem__)
        band = bounds.get((c, kind)) if kind else None
        yield {
            "id": _row_id(where["modelId"], where["layer"], head, i), **where, "index": str(head),
            "creatorId": config.creator_id, "tokens": windows[w], "values": values, "maxValue": values[peak],
            "maxValueTokenIndex": peak, "minValue": min(values),
            "zIndices": [[t] * len(z), [s for s, _ in z]], "zValues": [v for _, v in z],
            # Neuronpedia's interval samples: the band's activation range and the share of all tokens in it; -1 for
            # the top examples, as its exporters mark them.
            "binMin": band[0] if band else -1, "binMax": band[1] if band else -1, "binContains": band[2] if band else -1,
            "dataIndex": f"{int(store.window_doc[w])}:{int(store.window_start[w])}",
        }


def _band_bounds(store: HeadStore, bands: int) -> dict[tuple[int, int], tuple[float, float, float]]:
    """(column, band) -> (lowest, highest activation in the band, share of all tokens in it): the quantile bands
    the scan picked its examples from (`scan._pick_examples`), bands numbered from 1 (lowest)."""
    out = {}
    n_tokens = max(store.n_tokens, 1)
    for c in sorted(set(store.example_column[store.example_kind > 0].tolist())):
        values = store.activations(c).sort().values
        n = len(values)
        for band in range(bands):
            lo, hi = n * band // bands, n * (band + 1) // bands
            if hi > lo:
                out[(c, band + 1)] = (_trunc(values[lo]), _trunc(values[hi - 1]), (hi - lo) / n_tokens)
    return out


# ---- HeadVis -----------------------------------------------------------------------------------------------------


def _round(x: float) -> float:
    """To 4 decimals, as HeadVis's pipeline rounds."""
    return round(float(x), 4)


def _is_exact_copy(scan: ScanFolder, layer: int) -> bool:
    """Whether the scan's module at `layer` was an exact copy of the layer's attention (its QK groups are the MHSA
    heads), as the scan's record names it."""
    return any(spec.replace(" ", "") == f"{layer}=from-attention" for spec in scan.record.get("lorsa", []))


def _headvis(scan: ScanFolder, host: tuple[str, int], out: Path, model_id: str, config: ExportConfig) -> dict[str, int]:
    model_name, n_layers = host
    corpus = _corpus(scan)
    folder = out / model_id / "headvis" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", corpus).strip("-")[:100] or "corpus")
    text = _texts(scan.tokenizer)
    scatter, heads = [], []
    n_sequences = 0
    for store in scan.stores:
        for group, head in _group_heads(store, text).items():
            metrics = head.pop("metrics")
            scatter.append({"layer": store.layer, "head": group, **metrics})
            heads.append([store.layer, group])
            n_sequences += len(head["sequences"])
            files.write_json(folder / "heads" / f"L{store.layer}H{group}.json", head)
    kinds = {store.layer: "MHSA head (QK group of an exact copy)" if _is_exact_copy(scan, store.layer)
             else "Lorsa QK group" for store in scan.stores}
    widths = {int(store.tokens.shape[1]) for store in scan.stores}
    # Keys the loaders require (model_name, dataset_name, n_sequences, seq_len, dtype, attn_implementation) and the
    # frontend's keys as Neuronpedia's pipeline writes them. dtype is that of the stored patterns.
    files.write_json(folder / "config.json", {
        "model_name": model_name, "np_model_id": model_id, "dataset_name": corpus,
        "n_sequences": int(max(len(store.tokens) for store in scan.stores)), "seq_len": max(widths),
        "dtype": "float16", "attn_implementation": "lorsa",
        "heads": heads, "n_layers": n_layers, "n_heads": max(store.n_heads // store.group_size for store in scan.stores),
        "n_intervals": N_INTERVALS, "metrics": list(METRICS), "metric_descriptions": METRICS,
        "head_data_pattern": "L{layer}H{head}.json", "has_umap": False, "umap_heads": [],
        "custom_plots": [{"key": "qk_distance_histogram", "label": "Q-K distance"},
                         {"key": "histogram", "label": "Activation distribution"}],
        "custom_tables": [{"key": "top_query_tokens", "label": "Top query tokens"},
                          {"key": "top_key_tokens", "label": "Top key tokens"}],
        "statistics_display": {"n_samples": {"label": "Samples kept", "format": "default"},
                               "mean_max_activation": {"label": "Mean max activation", "format": "default"}},
        "pipeline_config": {"source": "lorsa-surgery heads export", "model": scan.record.get("model"),
                            "lorsa": scan.record.get("lorsa"), "head_kind": {str(k): v for k, v in kinds.items()},
                            "rows": "the QK group's attention at the example tokens of its heads in the scan"},
    })
    files.write_json(folder / "scatter_data.json", scatter)
    files.write_json(folder / "server_config.json", {})  # no server: the frontend's static-only mode
    files.write_json(folder / "attributions" / "manifest.json", {})
    return {"heads": len(heads), "sequences": n_sequences}


METRICS = {
    "self_attention_score": "Mean attention from each query position to itself.",
    "prev_token_score": "Mean attention to the immediately preceding token.",
    "pattern_entropy": "Mean Shannon entropy (nats) of each attention row.",
    "qk_distance": "Mean |q - k| weighted by attention.",
    "qk_distance_variance": "Variance of |q - k| weighted by attention.",
    "induction_score": "Mean attention from a token to the one after an earlier occurrence of it (rows with one).",
}
"""HeadVis's six metrics, computed over the query rows the scan kept."""


def _group_heads(store: HeadStore, text: Callable[[int], str]) -> dict[int, dict[str, Any]]:
    """QK group -> its HeadVis head JSON (with its metrics under "metrics"), from the attention rows of the
    examples of its heads: one row per (window, position), however many of the group's heads fired there."""
    group_of = store.heads[store.example_column.long()] // store.group_size
    out = {}
    for group in sorted(set(group_of.tolist())):
        seen: dict[tuple[int, int], int] = {}
        for i in (group_of == group).nonzero()[:, 0].tolist():
            seen.setdefault((int(store.example_window[i]), int(store.example_position[i])), i)
        by_window: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for (w, t), i in sorted(seen.items()):
            by_window.setdefault(w, []).append((t, store.example_attention[i].float()))
        out[group] = _head_json(store, by_window, text)
    return out


def _head_json(store: HeadStore, by_window: dict[int, list[tuple[int, torch.Tensor]]],
               text: Callable[[int], str]) -> dict[str, Any]:
    sums = dict.fromkeys(METRICS, 0.0)
    counts = {"rows": 0, "prev": 0, "induction": 0}
    distance_sq = 0.0
    qk_hist = [0.0] * (len(QK_DISTANCE_EDGES) - 1)
    query_mass: dict[str, float] = {}
    key_mass: dict[str, float] = {}
    sequences = []
    for w, rows in by_window.items():
        ids = store.window(w).tolist()
        tokens = [text(t) for t in ids]
        n = len(ids)
        indices, values, peak = [], [], 0.0
        for t, row in rows:
            p = row[: t + 1].double()
            d = torch.arange(t, -1, -1, dtype=torch.float64)  # |q - k| for k = 0..t
            counts["rows"] += 1
            sums["self_attention_score"] += float(p[t])
            if t:
                counts["prev"] += 1
                sums["prev_token_score"] += float(p[t - 1])
                peak = max(peak, float(p[1:].max()))  # HeadVis leaves out position 0 (the sink) in both directions
            sums["pattern_entropy"] += float(-(p * p.clamp_min(1e-30).log()).sum())
            sums["qk_distance"] += float((p * d).sum())
            distance_sq += float((p * d * d).sum())
            shifted = sorted({j + 1 for j in range(t) if ids[j] == ids[t]})
            if shifted:
                counts["induction"] += 1
                hits = p[shifted]
                sums["induction_score"] += float(hits[hits >= INDUCTION_FLOOR].sum())
            kept = p.topk(min(TOPK_PER_ROW, t + 1))
            for k, v in sorted(zip(kept.indices.tolist(), kept.values.tolist())):
                if v >= ROW_THRESHOLD:
                    indices.append(t * n + k)  # HeadVis's flat index: q * len(tokens) + k
                    values.append(_round(v))
                    qk_hist[_bin(t - k)] += v
                    query_mass[tokens[t]] = query_mass.get(tokens[t], 0.0) + v
                    key_mass[tokens[k]] = key_mass.get(tokens[k], 0.0) + v
        sequences.append({"sequence_id": w, "tokens": tokens, "attention_indices": indices,
                          "attention_values": values, "seq_len": n, "max_activation": _round(peak)})
    rows = max(counts["rows"], 1)
    mean_d = sums["qk_distance"] / rows
    metrics = {
        "self_attention_score": sums["self_attention_score"] / rows,
        "prev_token_score": sums["prev_token_score"] / counts["prev"] if counts["prev"] else None,
        "pattern_entropy": sums["pattern_entropy"] / rows, "qk_distance": mean_d,
        "qk_distance_variance": max(distance_sq / rows - mean_d**2, 0.0),
        "induction_score": sums["induction_score"] / counts["induction"] if counts["induction"] else None,
    }
    peaks = [s["max_activation"] for s in sequences]
    histogram = [0] * ACTIVATION_BINS
    for v in peaks:
        histogram[min(int(v * ACTIVATION_BINS), ACTIVATION_BINS - 1)] += 1
    sampled = _sample(sequences)

    def top(mass: dict[str, float]) -> list[dict[str, Any]]:
        return [{"token": t, "weight": _round(m)} for t, m in sorted(mass.items(), key=lambda kv: -kv[1])[:TOP_TOKENS]]

    return {
        "sequences": sampled,
        "qk_distance_histogram": {"bin_edges": QK_DISTANCE_EDGES, "bin_values": [_round(v) for v in qk_hist]},
        "top_query_tokens": top(query_mass), "top_key_tokens": top(key_mass),
        "histogram": {"bin_edges": [_round(i / ACTIVATION_BINS) for i in range(ACTIVATION_BINS + 1)],
                      "bin_values": histogram},
        "statistics": {"n_samples": len(sampled), "mean_max_activation": _round(sum(peaks) / len(peaks)) if peaks else None},
        "metrics": {k: None if v is None else _round(v) for k, v in metrics.items()},
    }


def _bin(distance: int) -> int:
    """The |q-k| histogram bin of a distance (the last bin takes anything beyond it)."""
    return min(bisect.bisect_right(QK_DISTANCE_EDGES, distance) - 1, len(QK_DISTANCE_EDGES) - 2)


def _sample(sequences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sequences in N_INTERVALS equal-count intervals of their max attention, numbered from 1 (lowest), as HeadVis
    samples: the strongest SAMPLES_PER_TOP_INTERVAL of the top interval, SAMPLES_PER_INTERVAL evenly spaced through
    each other one."""
    ranked = sorted(sequences, key=lambda s: (s["max_activation"], -s["sequence_id"]))
    n = len(ranked)
    picked = []
    for interval in range(1, N_INTERVALS + 1):
        members = ranked[n * (interval - 1) // N_INTERVALS : n * interval // N_INTERVALS]
        if interval == N_INTERVALS:
            chosen = members[::-1][:SAMPLES_PER_TOP_INTERVAL]
        else:
            k = min(SAMPLES_PER_INTERVAL, len(members))
            chosen = [members[len(members) * (2 * j + 1) // (2 * k)] for j in range(k)]
        picked += [{**s, "interval": interval} for s in chosen]
    return picked
