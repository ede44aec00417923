"""`heads export`: a scan as a Neuronpedia import bundle and as a HeadVis tree, every file checked against the
schemas in fixtures/export_schemas, which follow the code that reads those files in Neuronpedia's repository (each
schema's $comment names the file), not our writer."""

import gzip
import json
import math

import pytest

from conftest import FIXTURES
from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.analysis.export import ExportConfig, export_scan, read_scan
from test_interventions import cli, tiny_folders

SCHEMAS = FIXTURES / "export_schemas"
NEURONPEDIA_FILES = {"release.jsonl": "release", "model.jsonl": "model", "sourceset.jsonl": "sourceset",
                     "source.jsonl": "source", "features": "feature", "activations": "activation",
                     "explanations": "explanation"}


# ---- a JSON Schema subset, enough for the schemas in fixtures/export_schemas ----------------------------------------


def _is(value, kind: str) -> bool:
    if kind == "number":  # Postgres and JSON have no NaN or infinity
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return {"string": lambda v: isinstance(v, str), "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None, "array": lambda v: isinstance(v, list),
            "object": lambda v: isinstance(v, dict)}[kind](value)


def violations(value, schema: dict, path: str = "$") -> list[str]:
    """What in `value` breaks `schema` (type, enum, pattern, lengths, minimum, required, properties,
    additionalProperties, items, minItems, maxItems), one line each."""
    import re

    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"{path}: {json.dumps(value)[:60]} is not {kinds}"]
    out = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            out.append(f"{path}: length {len(value)} out of bounds")
    if _is(value, "number") and value < schema.get("minimum", -math.inf):
        out.append(f"{path}: {value} is under {schema['minimum']}")
    if isinstance(value, dict):
        out += [f"{path}: missing {key}" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                out += violations(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                out.append(f"{path}: {key} is not a field the reader takes")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            out.append(f"{path}: {len(value)} items out of bounds")
        if "items" in schema:
            for i, item in enumerate(value):
                out += violations(item, schema["items"], f"{path}[{i}]")
    return out


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def jsonl(path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def neuronpedia_violations(source_dir) -> list[str]:
    """Every schema violation in one source folder of a Neuronpedia bundle."""
    out = []
    for name, kind in NEURONPEDIA_FILES.items():
        paths = sorted((source_dir / name).glob("*.jsonl.gz")) if "." not in name else [source_dir / name]
        for path in paths:
            for i, row in enumerate(jsonl(path)):
                out += violations(row, schema(f"neuronpedia/{kind}"), f"{path.name}[{i}]")
    return out


def headvis_violations(run_dir) -> list[str]:
    """Every schema violation in a HeadVis run folder, and what the Neuronpedia panes' parsers would drop: a
    histogram with fewer than one edge more than values."""
    out = violations(json.loads((run_dir / "config.json").read_text()), schema("headvis/config"), "config")
    out += violations(json.loads((run_dir / "scatter_data.json").read_text()), schema("headvis/scatter_data"), "scatter")
    for path in sorted((run_dir / "heads").iterdir()):
        head = json.loads(path.read_text())
        out += violations(head, schema("headvis/head"), path.name)
        for key in ("qk_distance_histogram", "histogram"):
            hist = head.get(key, {})
            if len(hist.get("bin_edges", [])) < len(hist.get("bin_values", [])) + 1:
                out.append(f"{path.name}.{key}: fewer edges than values + 1")
        for seq in head.get("sequences", []):
            if len(seq.get("attention_indices", [])) != len(seq.get("attention_values", [])):
                out.append(f"{path.name}: attention_indices and attention_values differ in length")
    return out


# ---- a scan to export ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two scans of a tiny Llama's layer 1 on a short corpus: its sparse module (catalog labels on heads 5 and 17)
    and an exact copy of its attention (QK group h = MHSA head h)."""
    tmp = tmp_path_factory.mktemp("export")
    model_dir, lorsa_dir = tiny_folders(tmp)
    (tmp / "corpus.txt").write_text("The cat sat on the mat. The dog sat on the rug. " * 4)
    out = {}
    for name, module in (("sparse", lorsa_dir), ("copy", "from-attention")):
        result = cli("heads", "scan", model_dir, "--lorsa", f"1={module}", "--text", tmp / "corpus.txt", "-k", "3",
                     "--no-pages", "--out", tmp / name)
        assert result.exit_code == 0, result.output
        out[name] = tmp / name
    return out


def test_neuronpedia_bundle_follows_its_readers(scans, tmp_path):
    result = cli("heads", "export", scans["sparse"], "--format", "neuronpedia", "--out", tmp_path / "np")
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "np" / "model"  # the model was scanned from a folder named `model`
    assert [p.name for p in model_dir.iterdir()] == ["1-lorsa"]
    source = model_dir / "1-lorsa"
    assert neuronpedia_violations(source) == []

    scan = read_scan(scans["sparse"], tokenizer=False)
    store = scan.stores[0]
    features = jsonl(source / "features" / "batch-0.jsonl.gz")
    assert [f["index"] for f in features] == [str(h) for h in range(128)] == [str(h) for h in store.heads.tolist()]
    assert {f["layer"] for f in features} == {"1-lorsa"} and {f["modelId"] for f in features} == {"model"}
    rows = store.rows()
    assert [f["frac_nonzero"] for f in features] == [r["firing_rate"] for r in rows]
    fired = [f for f, r in zip(features, rows) if not r["dead"]]
    assert fired and all(sum(f["freq_hist_data_bar_heights"]) == r["fired"] for f, r in zip(features, rows) if not r["dead"])
    assert all(len(f["pos_str"]) == len(f["pos_values"]) == 10 and f["pos_values"] == sorted(f["pos_values"], reverse=True)
               for f in features)
    (model,) = jsonl(source / "model.jsonl")
    assert model["id"] == "model" and model["layers"] == 3 and model["neuronsPerLayer"] == 128
    (src,) = jsonl(source / "source.jsonl")
    (sourceset,) = jsonl(source / "sourceset.jsonl")
    (release,) = jsonl(source / "release.jsonl")
    assert src["id"] == "1-lorsa" and src["setName"] == sourceset["name"] == "lorsa" and sourceset["modelId"] == "model"
    assert sourceset["releaseName"] == release["name"] and src["num_prompts"] == len(store.tokens)

    activations = jsonl(source / "activations" / "batch-0.jsonl.gz")
    assert len(activations) == len(store.example_column) > 0
    assert len({a["id"] for a in activations}) == len(activations)
    for i, a in enumerate(activations):
        n = len(a["tokens"])
        assert len(a["values"]) == n and a["values"][a["maxValueTokenIndex"]] == a["maxValue"] == max(a["values"])
        targets, sources = a["zIndices"]
        assert len(targets) == len(sources) == len(a["zValues"]) > 0
        (target,) = set(targets)  # one example token per activation, fed by tokens at or before it
        assert target == int(store.example_position[i]) and all(0 <= s <= target < n for s in sources)
        assert a["values"][target] == pytest.approx(float(store.example_value[i]), abs=1e-4)
        contributions = store.example_contributions[i].float()
        assert a["zValues"] == pytest.approx([float(contributions[s]) for s in sources], abs=1e-4)
        assert max(abs(v) for v in a["zValues"]) == pytest.approx(float(contributions.abs().max()), abs=1e-4)
        in_band = int(store.example_kind[i]) > 0
        assert (a["binMin"] <= a["values"][target] <= a["binMax"]) if in_band else a["binMin"] == -1

    explanations = jsonl(source / "explanations" / "batch-0.jsonl.gz")
    assert sorted((e["index"], e["description"], e["notes"]) for e in explanations) == [("17", "tee", None),
                                                                                          ("5", "five", "a test head")]
    again = cli("heads", "export", scans["sparse"], "--format", "neuronpedia", "--out", tmp_path / "np")
    assert again.exit_code != 0 and "--overwrite" in again.output
    again = cli("heads", "export", scans["sparse"], "--format", "neuronpedia", "--out", tmp_path / "np", "--overwrite")
    assert again.exit_code == 0 and jsonl(source / "activations" / "batch-0.jsonl.gz") == activations


def test_headvis_tree_follows_its_readers(scans, tmp_path):
    for name, kind in (("sparse", "Lorsa QK group"), ("copy", "MHSA head")):
        result = cli("heads", "export", scans[name], "--format", "headvis", "--out", tmp_path / name, "--model-id", "tiny")
        assert result.exit_code == 0, result.output
        (run,) = (tmp_path / name / "tiny" / "headvis").iterdir()
        assert run.name == "corpus.txt" and headvis_violations(run) == []
        config = json.loads((run / "config.json").read_text())
        assert config["np_model_id"] == "tiny" and config["pipeline_config"]["head_kind"]["1"].startswith(kind)
        scatter = json.loads((run / "scatter_data.json").read_text())
        assert [(r["layer"], r["head"]) for r in scatter] == [(1, g) for g in range(4)] == [tuple(h) for h in config["heads"]]
        assert sorted(p.name for p in (run / "heads").iterdir()) == [f"L1H{g}.json" for g in range(4)]
        for row in scatter:
            for metric in ("self_attention_score", "prev_token_score", "induction_score"):
                assert 0 <= row[metric] <= 1
            assert row["pattern_entropy"] >= 0 and row["qk_distance"] >= 0 and row["qk_distance_variance"] >= 0

    store = read_scan(scans["sparse"], tokenizer=False).stores[0]
    group = store.heads[store.example_column.long()] // store.group_size
    run = tmp_path / "sparse" / "tiny" / "headvis" / "corpus.txt"
    head = json.loads((run / "heads" / "L1H0.json").read_text())
    rows = {(int(store.example_window[i]), int(store.example_position[i])): i for i in (group == 0).nonzero()[:, 0].tolist()}
    self_attention = sum(float(store.example_attention[i, t]) for (_, t), i in rows.items()) / len(rows)
    row = json.loads((run / "scatter_data.json").read_text())[0]
    assert row["head"] == 0 and row["self_attention_score"] == pytest.approx(self_attention, abs=1e-4)

    sequences = head["sequences"]
    windows = {w for w, _ in rows}
    assert 0 < len(sequences) <= len(windows) and head["statistics"]["n_samples"] == len(sequences)
    assert sum(head["histogram"]["bin_values"]) == len(windows)  # every window with a row, sampled or not
    by_interval = {}
    for seq in sequences:
        n = len(seq["tokens"])
        assert n == int((store.tokens[seq["sequence_id"]] >= 0).sum())
        pairs = [divmod(flat, n) for flat in seq["attention_indices"]]
        assert pairs and all(0 <= k <= q < n for q, k in pairs)
        assert {q for q, _ in pairs} <= {t for w, t in rows if w == seq["sequence_id"]}
        assert all(0.005 <= v <= 1 for v in seq["attention_values"])
        by_interval.setdefault(seq["interval"], []).append(seq["max_activation"])
    assert set(by_interval) <= set(range(1, 6))
    ordered = [by_interval[i] for i in sorted(by_interval)]
    assert all(max(lower) <= min(higher) for lower, higher in zip(ordered, ordered[1:]))  # intervals rise with activation
    edges = head["histogram"]["bin_edges"]
    assert all(edges[0] <= v <= edges[-1] for values in ordered for v in values)


def test_a_corrupted_export_fails_the_schemas(scans, tmp_path):
    cli("heads", "export", scans["sparse"], "--format", "neuronpedia", "--out", tmp_path / "np")
    source = tmp_path / "np" / "model" / "1-lorsa"
    path = source / "activations" / "batch-0.jsonl.gz"
    rows = jsonl(path)
    rows[0].pop("maxValue")
    rows[1]["tokens"][0] = 7
    rows[2]["zIndices"] = rows[2]["zIndices"][:1]
    rows[3]["maxvalue"] = 1.0
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    (source / "model.jsonl").write_text(json.dumps({"id": "a b", "creatorId": "x", "layers": 3, "neuronsPerLayer": 1,
                                                    "owner": "x"}) + "\n")
    found = "\n".join(neuronpedia_violations(source))
    for expected in ("missing maxValue", ".tokens[0]: 7 is not string", ".zIndices: 1 items", "maxvalue is not a field",
                     "does not match"):
        assert expected in found

    cli("heads", "export", scans["sparse"], "--format", "headvis", "--out", tmp_path / "hv")
    (run,) = (tmp_path / "hv" / "model" / "headvis").iterdir()
    head_path = run / "heads" / "L1H0.json"
    head = json.loads(head_path.read_text())
    head["histogram"]["bin_values"] = []
    head["sequences"][0]["attention_indices"] = head["sequences"][0]["attention_indices"][1:]
    head["top_key_tokens"][0]["weight"] = "heavy"
    head_path.write_text(json.dumps(head))
    found = "\n".join(headvis_violations(run))
    for expected in ("bin_values: 0 items", "differ in length", '"heavy" is not number'):
        assert expected in found


def test_refusals_come_before_any_work(scans, tmp_path):
    with pytest.raises(LorsaSurgeryError, match="Unknown export format 'csv'"):
        export_scan(scans["sparse"], "csv", tmp_path / "out")
    with pytest.raises(LorsaSurgeryError, match="holds no scan.json"):
        export_scan(tmp_path, "headvis", tmp_path / "out")
    with pytest.raises(LorsaSurgeryError, match="letters, digits"):
        export_scan(scans["sparse"], "headvis", tmp_path / "out", config=ExportConfig(model_id="a/b"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    result = cli("heads", "export", scans["sparse"], "--format", "headvis", "--out", tmp_path / "theirs")
    assert result.exit_code != 0 and "did not write" in result.output and len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"
    result = cli("heads", "export", scans["sparse"], "--format", "csv", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "'csv' is not one of" in result.output and not (tmp_path / "out").exists()
