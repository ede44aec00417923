"""Every script in examples/ runs in its fast mode: here, or in the test file of the part it shows."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _run(script: str, *args: str, env: dict | None = None, timeout: int = 900) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_run_by_a_test():
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    ran = set(re.findall(r'"([a-z0-9_]+\.py)"', tests))
    assert EXAMPLES and sorted(p.name for p in EXAMPLES if p.name not in ran) == []


@pytest.mark.slow
def test_ablate_and_steer_finds_induction_heads_and_steers(smollm2_gguf, tmp_path):
    out = _run("ablate_and_steer.py", "--out", str(tmp_path))
    assert "steering" in out and any(p.suffix == ".html" for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_patching_sweep_restores_part_of_the_logit_difference(smollm2_gguf, tmp_path):
    out = _run("patching_sweep.py", "--fast", "--out", str(tmp_path))
    clean, corrupt = map(float, re.search(r"clean (-?[\d.]+), corrupted (-?[\d.]+)", out).groups())
    assert clean > 0 > corrupt
    rows = [line for line in out.splitlines() if line.startswith("| L23.H")]
    assert len(rows) == 10 and float(rows[0].split("|")[4]) > corrupt  # the best single patch moves towards clean
    assert (tmp_path / "ioi_sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_placement_offloads_part_of_the_model_and_computes_the_same(smollm2_gguf):
    out = _run("placement.py", "--fast")
    assert re.search(r"parts on disk", out) and re.search(r"parts on cpu", out)
    gaps = [float(g) for g in re.findall(r"between the placements ([\d.e+-]+)", out)]
    assert len(gaps) == 2 and max(gaps) < 1e-4


@pytest.mark.slow
def test_publish_example_pushes_to_the_hub(smollm2_gguf, tmp_path, hub):
    out = _run("publish.py", "--repo-id", "lorsa-tester/example-publish", "--out", str(tmp_path / "patched"))
    repo = hub.repos["lorsa-tester/example-publish"]
    assert "Pushed:" in out and "README.md" in repo.commits[repo.refs["main"]]


@pytest.mark.slow
def test_multihop_reproduction_runs_in_fast_mode(smollm2_gguf, tmp_path):
    out = _run("multihop_reproduction.py", "--fast", "--out", str(tmp_path))
    assert "letter: accuracy" in out and "number: accuracy" in out and "head classes" in out
    assert "hand-built symbolic head" in out
    assert (tmp_path / "results.json").is_file() and (tmp_path / "accuracy_vs_length.png").is_file()


def test_multihop_sweep_trains_each_run_once_and_tabulates(tmp_path):
    out = _run("multihop_sweep.py", "--fast", "--out", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| small") or line.startswith("| lr1e-4")]
    assert len(rows) == 2 and "lr=0.0001" in rows[1] and (tmp_path / "lr1e-4" / "lengths.json").is_file()
    stamp = (tmp_path / "small" / "lengths.json").stat().st_mtime_ns
    again = _run("multihop_sweep.py", "--fast", "--out", str(tmp_path))
    assert again.split("| run")[1] == out.split("| run")[1]
    assert (tmp_path / "small" / "lengths.json").stat().st_mtime_ns == stamp  # measured runs are not redone


@pytest.mark.slow
def test_smollm2_end_to_end_trains_splices_detects_steers_and_pushes(smollm2_gguf, tmp_path, hub):
    out = _run("smollm2_end_to_end.py", "--repo-id", "lorsa-tester/example-e2e", "--fast", "--out", str(tmp_path))
    assert re.search(r"trained L3: 1152 heads, held-out explained variance 0\.\d+", out)
    assert "head families: previous_token" in out and "LM loss on prose" in out
    texts = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(("spliced:", "every head ablated:")))
    assert texts["spliced:"[:-1]] != texts["every head ablated"]  # ablating the whole layer changes the text
    repo = hub.repos["lorsa-tester/example-e2e"]
    assert "Pushed:" in out and "layer_3/lorsa.safetensors" in repo.commits[repo.refs["main"]]


@pytest.mark.slow
def test_complete_replacement_trains_heals_and_measures_in_fast_mode(smollm2_gguf, tmp_path):
    out = _run("complete_replacement.py", "--fast", "--out", str(tmp_path / "complete"))
    report = json.loads((tmp_path / "complete" / "report.json").read_text())
    assert [(r["order"], r["k"]) for r in report["rows"]] == [("first", 1), ("first", 2), ("cheapest", 1), ("cheapest", 2)]
    for row in report["rows"]:
        for text in ("held_out", "other_domains"):
            numbers = row[text]
            assert numbers["floor_kl"] > 0 and numbers["kl"] > 0 and numbers["tokens"] > 0
            if numbers["floor"] > numbers["original"]:
                assert numbers["recovered"] == pytest.approx((numbers["floor"] - numbers["replaced"]) / (numbers["floor"] - numbers["original"]))
            else:  # mean-ablating the layers costs nothing here: no share to speak of
                assert numbers["recovered"] is None
    healed = report["healed"]["other_domains"]
    assert healed["kl"] > 0 and healed["tokens"] == report["rows"][1]["other_domains"]["tokens"]
    assert all(0 < report["heads"][str(layer)]["l0"] <= 8 for layer in (0, 1))
    assert report["generation"]["ratio"] > 0 and "all, healed" in out
    assert (tmp_path / "complete" / "replacement.png").stat().st_size > 10_000


@pytest.mark.slow
def test_circuits_example_checks_attribution_against_patching_in_fast_mode(smollm2_gguf, tmp_path):
    out = _run("circuits_smollm2.py", "--fast", "--modules", "smollm2-complete", "--out", str(tmp_path / "circuits"))
    report = json.loads((tmp_path / "circuits" / "report.json").read_text())
    assert report["layers"] == 30 and "Induction circuit" in out
    for task in ("ioi", "induction"):
        nodes = report[task]["nodes"]
        assert len(nodes["heads"]) == 24 and nodes["clean"] > nodes["baseline"]
        (edges,) = report[task]["edges"]
        assert len(edges["edges"]) == 9 and {e["kind"] for e in edges["edges"]} == {"q", "k", "v"}
        assert edges["spearman_frozen"] > 0.5  # measured 0.97 to 1.0
        for plot in (f"{task}_nodes.png", f"{task}_edges_direct.png"):
            assert (tmp_path / "circuits" / plot).stat().st_size > 10_000
    ioi = report["ioi"]["nodes"]
    assert ioi["spearman_frozen"] > 0.6  # measured 0.92 and 0.98
    assert ioi["relative_gap_frozen"] < ioi["relative_gap"]  # top-K jumps are much of the gap (measured 14% against 30%)
    circuit = report["circuit"]
    assert circuit["heads"] and circuit["faithfulness"]["prompts"] == 6
    assert circuit["necessity"]["lost"]["low"] <= circuit["necessity"]["lost"]["mean"] <= circuit["necessity"]["lost"]["high"]
    assert circuit["overlap"]["either"]["firing"] > circuit["overlap"]["either"]["labelled_firing"] > 0
    movers = report["name_movers"]  # the catalogued name movers at the last IOI position, and what feeds them
    assert movers["catalogued"] > 0 and 0 < len(movers["targets"]) <= 3 and "IOI name movers" in out
    assert sum(movers["kinds"].values()) == pytest.approx(1) and movers["query_sources"]


@pytest.mark.slow
def test_families_across_depth_tables_each_layer_and_writes_catalogs(smollm2_gguf, tmp_path):
    import shutil

    from lorsa_surgery.publishing.patched import COMPLETE, shipped

    modules = tmp_path / "modules"
    for layer in (0, 1):  # a copy: the run writes the catalogs
        shutil.copytree(shipped(COMPLETE) / f"layer_{layer}", modules / f"layer_{layer}")
        (modules / f"layer_{layer}" / "head_catalog.json").unlink()
    out = _run("families_across_depth.py", "--modules", str(modules), "--out", str(tmp_path / "families"),
               "--layers", "0,1", "--prompts", "4")
    rows = [line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all(line.endswith("% |") for line in rows)
    report = json.loads((tmp_path / "families" / "detect.json").read_text())
    assert sorted(report) == ["L0", "L1"] and len(report["L1"]["provenance"]["main_share"]) == 576
    labelled = json.loads((modules / "layer_1" / "head_catalog.json").read_text())["heads"]
    assert labelled and len(labelled) == len({h for f in report["L1"] if f != "provenance"
                                              for h in report["L1"][f]["members"] + report["L1"][f]["attending"]})


@pytest.mark.slow
def test_circuits_multihop_splices_every_layer_finds_circuits_and_reuses_its_modules(tmp_path):
    out = _run("circuits_multihop.py", "--fast", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report["layers"]) == [str(layer) for layer in range(6)] and "Task accuracy" in out
    assert not any(row["reused"] for row in report["layers"].values())
    for model in ("original", "spliced"):
        assert 0 <= report["accuracy"][model]["accuracy"] <= 1 and sorted(report["accuracy"][model]["per_hop"]) == ["1", "2", "3", "4"]
    assert sorted(report["circuits"]) == ["1", "2"]
    for hops, circuit in report["circuits"].items():
        assert circuit["corrupt_position"] == (16 if hops == "1" else 12) and 0 < circuit["nodes"] <= 20 and circuit["heads"]
        assert circuit["faithfulness"]["prompts"] == circuit["necessity"]["prompts"] == 6
        lost = circuit["necessity"]["lost"]
        assert lost["low"] <= lost["mean"] <= lost["high"]
        for by_class in circuit["edges"].values():
            assert by_class and all(sum(e["kinds"].values()) == pytest.approx(1) for e in by_class.values())
    _run("circuits_multihop.py", "--fast", "--out", str(tmp_path))
    again = json.loads((tmp_path / "report.json").read_text())
    assert all(row["reused"] for row in again["layers"].values()) and again["layers"]["3"] == {**report["layers"]["3"], "reused": True}


@pytest.mark.slow
def test_heal_text_choice_heals_on_each_text_and_measures_all_three(smollm2_gguf, tmp_path):
    out = _run("heal_text_choice.py", "--fast", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = {"documentation", "sampled", "prose"}
    for name in ("unhealed", "documentation", "sampled", "half of each"):
        assert kinds <= set(report[name]) and all(report[name][k] > 0 for k in kinds)
        assert name in out
    assert report["documentation"] != report["sampled"]  # different text, different healing
