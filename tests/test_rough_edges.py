"""The small things a researcher trips over, one test each: checks that happen before a model loads, names that
do not collide, what `inspect`, `generate`, `patch` and the examples say and write."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorsa_surgery import LorsaSurgeryError

from lorsa_surgery.host import models
from lorsa_surgery.analysis.plots import sweep_changes
from lorsa_surgery.interventions.patching import SweepResult
from test_interventions import cli, tiny_folders

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def folders(tmp_path):
    return tiny_folders(tmp_path)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if anything loads a host model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def test_heads_of_unspliced_layers_fail_before_the_model_loads(folders, no_model_load):
    model_dir, lorsa_dir = folders
    result = cli("ablate", model_dir, "--lorsa", f"1={lorsa_dir}", "--heads", "L5.H3", "--prompt", "abc")
    assert result.exit_code == 1 and "L5.H3 names layer 5, which carries no Lorsa module (spliced layers: 1)" in result.output
    result = cli("generate", model_dir, "--prompt", "abc", "--steer", "L1.H3=2")
    assert result.exit_code == 1 and "pass --lorsa LAYER=PATH" in result.output
    result = cli("heads", "zpattern", model_dir, "--lorsa", f"1={lorsa_dir}", "L2.H0", "--prompt", "abc")
    assert result.exit_code == 1 and "names layer 2" in result.output


def test_a_bad_lorsa_module_fails_before_the_model_loads(folders, tmp_path, no_model_load):
    model_dir, _ = folders
    result = cli("generate", model_dir, "--lorsa", f"1={tmp_path / 'missing'}", "--prompt", "abc")
    assert result.exit_code == 1 and "Missing file or folder" in result.output


def test_k_larger_than_the_heads_fails_before_the_model_loads(folders, tmp_path, no_model_load):
    model_dir, _ = folders
    args = ["train", model_dir, "--layer", "1", "--tokens", "1024", "--out", tmp_path / "run"]
    result = cli(*args, "--heads", "32", "--k", "40")
    assert result.exit_code == 1 and "k (40) and k_start cannot exceed the number of heads (32)" in result.output
    result = cli(*args, "--expansion", "0.5", "--k", "40")  # 0.5 x d_model 64 = 32 heads, read from the config alone
    assert result.exit_code == 1 and "cannot exceed the number of heads (32)" in result.output


def test_a_position_past_the_prompt_is_an_error(folders):
    model_dir, lorsa_dir = folders
    result = cli("heads", "zpattern", model_dir, "--lorsa", f"1={lorsa_dir}", "L1.H5", "--prompt", "ab", "--position", "50")
    assert result.exit_code == 1 and "Position 50 is out of range: the input has 2 tokens" in result.output
    assert cli("heads", "zpattern", model_dir, "--lorsa", f"1={lorsa_dir}", "L1.H5", "--prompt", "ab", "--position", "-2").exit_code == 0


def test_mhsa_heads_are_named_apart_from_lorsa_heads(folders):
    model_dir, lorsa_dir = folders
    result = cli("heads", "classify", model_dir, "--lorsa", f"1={lorsa_dir}", "-n", "2", "--items", "5", "--block", "16")
    assert result.exit_code == 0, result.output
    assert "L1.A0 " in result.output and "L1.QK0 (heads 0-31)" in result.output and "L1.H0 " not in result.output


def test_inspect_reads_patched_folders_and_shows_labels(folders, tmp_path):
    import lorsa_surgery as ls

    model_dir, lorsa_dir = folders
    model, _ = ls.load_model(model_dir)
    with ls.splice(model, {1: ls.Lorsa.from_pretrained(lorsa_dir)}) as handle:
        ls.save_patched(handle, tmp_path / "patched")
    result = cli("inspect", tmp_path / "patched", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["patched_model"]["mode"] == "replace" and info["layers"]["1"]["labels"] == {"H5": "five", "H17": "tee"}
    text = cli("inspect", lorsa_dir)
    assert text.exit_code == 0 and "H5=five" in text.output


def test_generate_says_which_saved_interventions_are_active(folders, tmp_path):
    model_dir, lorsa_dir = folders
    saved = cli("steer", model_dir, "--lorsa", f"1={lorsa_dir}", "--heads", "L1:tee", "--clamp", "300", "--positions", "generated",
                "--prompt", "abc", "--save", tmp_path / "steered")
    assert saved.exit_code == 0, saved.output
    result = cli("generate", tmp_path / "steered", "--base", model_dir, "--prompt", "abc", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "Active interventions saved with the model:\n  steer L1:tee clamp=300.0 at generated" in result.stderr
    assert "Active interventions" not in result.stdout


def test_loader_progress_bars_show_only_with_verbose(folders):
    model_dir, lorsa_dir = folders
    quiet = cli("generate", model_dir, "--prompt", "abc", "--max-new-tokens", "2")
    assert quiet.exit_code == 0 and "Loading weights" not in quiet.stderr
    loud = cli("--verbose", "generate", model_dir, "--prompt", "abc", "--max-new-tokens", "2")
    assert loud.exit_code == 0 and "Loading weights" in loud.stderr


def test_patch_json_is_compact_and_metrics_work_without_a_sweep(folders):
    model_dir, lorsa_dir = folders
    common = ["patch", model_dir, "--lorsa", f"1={lorsa_dir}", "--heads", "L1.H0-63", "--source", "the dog ran", "--prompt", "the cat sat"]
    result = cli(*common, "--metric", "logit-diff", "--token", "s", "--vs-token", "t", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(result.stdout) < 2000  # the source cache is described, not dumped
    assert out["interventions"][0]["source"]["heads"][:2] == ["L1.H0", "L1.H1"] and "values" not in out["interventions"][0]["source"]
    effect = out["effects"][0]
    assert effect["metric"].startswith("logit[") and effect["metric_before"] != effect["metric_after"]


def test_sweeps_show_tokens_warn_when_heads_never_fire_and_plot_noise_as_zero(folders, tmp_path):
    model_dir, lorsa_dir = folders
    common = ["patch", model_dir, "--lorsa", f"1={lorsa_dir}", "--source", "the dog ran", "--prompt", "the cat sat", "--sweep",
              "--token", "s", "--vs-token", "t"]
    result = cli(*common, "--heads", "L1.H20-21", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["position_tokens"] == list("the cat sat")
    table = cli(*common, "--heads", "L1.H20-21")
    for line in table.stdout.splitlines()[2:]:  # rows show the token, not only its position
        position = int(line.split()[1])
        assert f" {'the cat sat'[position]!r} " in line
    silent = cli(*common, "--heads", "L1:five", "--plot", tmp_path / "sweep.png")  # L1.H5 fires on neither prompt
    assert silent.exit_code == 0 and "fire on neither prompt" in silent.stderr and (tmp_path / "sweep.png").is_file()
    noise = SweepResult(values=torch.tensor([[1.0 + 3e-7, 1.0 - 2e-7], [1.2, 1.0]]), heads=["a", "b"], names=["a", "b"],
                        positions=[0, 1], metric="m", baseline=1.0)
    assert sweep_changes(noise).tolist() == [[0.0, 0.0], [pytest.approx(0.2), 0.0]]


@pytest.mark.slow
def test_the_training_example_writes_only_under_its_out(tmp_path):
    shipped = ROOT / "lorsa_surgery" / "default_modules" / "smollm2-L3"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "train_default_modules.py"), "--layer", "3", "--fast",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before
    assert (tmp_path / "run" / "module" / "lorsa.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_config_errors_are_plain_sentences():
    from lorsa_surgery.training.healing import HealConfig

    with pytest.raises(LorsaSurgeryError, match="lora_rank must not be negative"):
        HealConfig(lora_rank=-1)
