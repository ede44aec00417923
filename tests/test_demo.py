"""`lorsa-surgery demo --fast` end to end on the embedded SmolLM2: the report holds every measured part of the story,
reuses its cached steps on a second run, pushes to a configured Hub or to one it starts itself, and renders in
headless Chromium with every image loaded and no console error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_analysis import CHROMIUM, _chromium

def _demo(out: Path, *extra: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    done = subprocess.run([Path(sys.executable).with_name("lorsa-surgery"), "demo", "--fast", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def demo_run(smollm2_gguf, tmp_path_factory):
    """One fresh fast demo with no Hub configured, caching its steps in the session's cache."""
    root = tmp_path_factory.mktemp("demo")
    done = _demo(root / "out", "--fresh")
    return root, Path(os.environ["LORSA_SURGERY_CACHE"]), done


@pytest.mark.slow
def test_demo_reports_every_measured_part_and_pushes_to_a_hub_it_starts(demo_run):
    root, cache, done = demo_run
    results = json.loads((root / "out" / "results.json").read_text())
    splice = results["splice"]
    assert set(splice["layers"]) == {"3", "18", "23"} and all(0 < r["explained_variance"] <= 1 for r in splice["layers"].values())
    assert splice["lm_loss"]["spliced"] > 0 and splice["lm_loss"]["original"] > 0
    complete = results["complete"]  # every attention layer replaced, healed, measured on the prose against the floor
    assert complete["layers"] == 30 and complete["kl"] > 0 and complete["replaced"] < complete["floor"]
    assert complete["recovered"] == pytest.approx(
        (complete["floor"] - complete["replaced"]) / (complete["floor"] - complete["original"]))
    assert {row["state"] for row in complete["recorded"]["rows"]} == {"unhealed", "healed"}
    assert complete["generation"]["replaced"].strip() and complete["generation"]["original"].strip()
    readers = results["families"]["readers"]  # layer 18's heads that read like induction heads, ablated together
    ablation = results["interventions"]["ablation"]
    assert readers["layer"] == 18 and ablation["heads"] == [f"L18.H{h}" for h in readers["heads"]]
    assert results["families"]["shown"]["head"] == results["interventions"]["steer"]["head"] in ablation["heads"]
    assert ablation["control"] and not set(ablation["control"]) & set(ablation["heads"])
    assert ablation["restored"]["mean"] == pytest.approx(ablation["clean"]["mean"], abs=1e-6)  # patched back exactly
    assert ablation["effect"]["mean"] == pytest.approx(ablation["clean"]["mean"] - ablation["ablated"]["mean"], abs=1e-6)
    steer = results["interventions"]["steer"]
    assert steer["steered"] != steer["plain"]  # the clamped head changes the greedy text
    patch = results["interventions"]["patch"]
    assert patch["layer"] == 23 and patch["clean"] > 0 > patch["corrupt"] and patch["patched"]["all heads"]["restored"] > 0.5
    for task in ("number", "letter"):
        labels = results["positional"]["tasks"][task]["labels"]
        assert len(labels) == results["size"]["task_layers"] and all(l in ("positional", "symbolic", "mixed") for row in labels for l in row)
    push = results["publish"]
    assert push["where"].startswith("a local Hub server") and push["all_pushed"] and "README.md" in push["files"]
    report = (root / "out" / "report.md").read_text()
    for shown in ("explained variance", "LM loss", "matched control", "steered:", "labels by layer", "Pushed to",
                  "Complete replacement", "Recorded in the shipped model", "complete replacement:", "induction readers"):
        assert shown in report
    assert f"{100 * complete['recovered']:.1f}% of the loss recovered" in report  # the lead result, measured here
    assert report in done.stdout  # the command prints the summary
    html = (root / "out" / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') >= 3 and "srcdoc=" in html  # plots and dashboard inside
    assert 'id="lead-complete"' in html and 'id="lead-induction"' in html and html.count('class="recorded"') == len(complete["recorded"]["rows"])
    assert "http://" not in html.replace(push["where"], "")  # nothing to fetch: it opens from disk


@pytest.mark.slow
def test_second_demo_run_reuses_cached_steps_and_pushes_to_the_configured_hub(demo_run, hub):
    root, cache, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in cache.glob("demo/fast/*/result.json")}
    assert len(before) == 5
    _demo(root / "again", endpoint=hub.url)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("demo/fast/*/result.json")} == before
    push = json.loads((root / "again" / "results.json").read_text())["publish"]
    assert push["where"] == f"the configured Hub ({hub.url})" and push["all_pushed"]
    assert "model.safetensors" not in push["files"] and "lorsa-tester/lorsa-demo-smollm2" in hub.repos


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for headless rendering (apt-get install -y chromium)")
def test_demo_report_renders_in_headless_chromium_with_every_image(demo_run, tmp_path):
    root, _, _ = demo_run
    page = (root / "out" / "report.html").as_uri()
    dumped = _chromium(tmp_path, page, "--dump-dom", "--virtual-time-budget=5000").stdout  # and no console error
    images = dumped.split('data-images="')[1].split('"')[0]
    loaded, total = map(int, images.split("/"))
    assert total >= 4 and loaded == total
    shot = tmp_path / "report.png"
    _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1100,4000")
    assert shot.stat().st_size > 50_000


def test_demo_refuses_a_file_for_its_output_folder_before_any_work(tmp_path):
    from click.testing import CliRunner

    from lorsa_surgery.cli import main

    (tmp_path / "report").write_text("not a folder")
    result = CliRunner().invoke(main, ["demo", "--fast", "--out", str(tmp_path / "report")])
    assert result.exit_code == 1 and "is not a folder" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["demo", "--fast", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "did not write" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "report").read_text() == "not a folder"


_PUBLISH_TWICE = """
import json, os, sys
from pathlib import Path
from lorsa_surgery.demo.report import _publish
from lorsa_surgery.host.splicing import splice
from test_splice import LAYER, sparse_module, tiny

model = tiny("llama")
with splice(model, {LAYER: sparse_module(model)}) as handle:
    handle.base = {"id": "ns/tiny", "revision": None}
    pushes = [_publish(handle, {}, Path(sys.argv[1]) / "plain")]
    os.environ["HF_ENDPOINT"] = sys.argv[2]
    pushes.append(_publish(handle, {}, Path(sys.argv[1]) / "configured"))
print(json.dumps(pushes))
"""


def test_publish_with_hf_hub_offline_pushes_to_the_demos_own_loopback_server(hub, tmp_path):
    """HF_HUB_OFFLINE=1 is read when huggingface_hub is imported, so the demo's publish step runs in a fresh process:
    once with no Hub configured, once with one configured that offline mode rules out (and that sees no request)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _PUBLISH_TWICE, str(tmp_path), hub.url], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain, configured = json.loads(done.stdout.strip().splitlines()[-1])
    for push in (plain, configured):
        assert push["where"].startswith("a local Hub server started by the demo") and push["all_pushed"]
        assert "README.md" in push["files"]
    assert f"HF_HUB_OFFLINE=1 rules out the configured Hub ({hub.url})" in configured["where"] and not hub.requests


def test_a_step_cached_by_another_version_of_the_demo_is_computed_again(tmp_path, monkeypatch):
    """A cached step is read back only when this version of the demo wrote it: one written by another version (whose
    results may lack fields the report now reads) is computed again, and `fresh` always computes."""
    from lorsa_surgery.demo import report

    calls = []

    def work(where: Path) -> dict:
        (where / "plot.png").write_bytes(b"new")
        calls.append(where)
        return {"value": len(calls)}

    first, read_back = report._step_cache(tmp_path, "step", work, fresh=False)
    assert (first["value"], read_back) == (1, False)
    again, read_back = report._step_cache(tmp_path, "step", work, fresh=False)
    assert (again["value"], read_back) == (1, True) and len(calls) == 1
    monkeypatch.setattr(report, "CODE", "another version")
    newer, read_back = report._step_cache(tmp_path, "step", work, fresh=False)
    assert (newer["value"], newer["code"], read_back) == (2, "another version", False)
    fresh, read_back = report._step_cache(tmp_path, "step", work, fresh=True)
    assert (fresh["value"], read_back) == (3, False)
