"""Publishing folders to the Hub and fetching them back (lorsa_surgery.hub, `lorsa-surgery push/pull`).

Everything runs against the local Hub server started in conftest.py, through the real client.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi
from huggingface_hub.utils import logging as hf_logging
from safetensors.torch import save_file

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.hub import pull, push_folder


def _write_model(folder: Path, version: int) -> Path:
    """A folder shaped like a published model: weights, a model card, and one folder per layer."""
    for layer in (0, 1):
        (folder / f"layer{layer}").mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4, 4), float(version + layer))}, folder / f"layer{layer}" / "weights.safetensors")
        (folder / f"layer{layer}" / "config.json").write_text(json.dumps({"layer": layer, "version": version}))
    (folder / "README.md").write_text(f"---\nlibrary_name: lorsa-surgery\ntags: [lorsa]\n---\n# Version {version}\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    """The folder's files by relative path, without the repo's .gitattributes and the client's .cache."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".gitattributes" and ".cache" not in p.relative_to(folder).parts
    }


def _commits(hub) -> int:
    return sum(r.method == "POST" and "/commit/" in r.path for r in hub.requests)


def test_push_then_pull_round_trips_a_folder_in_one_commit(hub, tmp_path):
    src = _write_model(tmp_path / "src", 1)
    info = push_folder(src, "lib/roundtrip", commit_message="first")
    assert _commits(hub) == 1 and hub.refs("lib/roundtrip")["main"] == info.oid
    assert _files(pull("lib/roundtrip")) == _files(src)
    out = pull("lib/roundtrip", out_dir=tmp_path / "out")
    assert out == tmp_path / "out" and _files(out) == _files(src)
    # A pulled copy pushes back without the client's .cache/huggingface metadata.
    push_folder(out, "lib/roundtrip-copy", private=True)
    assert hub.repos["lib/roundtrip-copy"].private
    assert HfApi().list_repo_files("lib/roundtrip-copy") == sorted([".gitattributes", *_files(src)])


def test_a_pinned_commit_still_gives_the_old_files_after_a_second_push(hub, tmp_path):
    v1 = _write_model(tmp_path / "v1", 1)
    v2 = _write_model(tmp_path / "v2", 2)
    first = push_folder(v1, "lib/pinned")
    push_folder(v2, "lib/pinned")
    assert _files(pull("lib/pinned", revision=first.oid)) == _files(v1)
    assert _files(pull("lib/pinned")) == _files(v2)


def test_pull_of_a_subfolder_fetches_only_that_subfolder(hub, tmp_path):
    src = _write_model(tmp_path / "src", 1)
    push_folder(src, "lib/subfolder")
    hub.reset()
    got = pull("lib/subfolder:layer1")
    assert got.name == "layer1" and _files(got) == _files(src / "layer1")
    fetched = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert fetched and all("/layer1/" in path for path in fetched)
    configs_only = pull("lib/subfolder:layer0", allow_patterns="*.json")
    assert _files(configs_only) == {"config.json": (src / "layer0" / "config.json").read_bytes()}


def test_pull_returns_a_local_folder_as_it_is(hub, tmp_path):
    assert pull(tmp_path) == tmp_path
    with pytest.raises(LorsaSurgeryError, match="^Missing folder: "):
        pull(tmp_path / "missing")
    assert hub.requests == []


def test_push_to_a_new_branch_creates_it_and_leaves_main_alone(hub, tmp_path):
    push_folder(_write_model(tmp_path / "v1", 1), "lib/branch")
    main_before = hub.refs("lib/branch")["main"]
    info = push_folder(_write_model(tmp_path / "v2", 2), "lib/branch", revision="dev")
    assert hub.refs("lib/branch") == {"main": main_before, "dev": info.oid}
    assert _files(pull("lib/branch", revision="dev")) == _files(tmp_path / "v2")


def test_create_pr_opens_a_pull_request_ref(hub, tmp_path):
    push_folder(_write_model(tmp_path / "v1", 1), "lib/pr")
    main_before = hub.refs("lib/pr")["main"]
    info = push_folder(_write_model(tmp_path / "v2", 2), "lib/pr", create_pr=True)
    assert info.pr_revision == "refs/pr/1"
    assert hub.refs("lib/pr") == {"main": main_before, "refs/pr/1": info.oid}
    assert _files(pull("lib/pr", revision="refs/pr/1")) == _files(tmp_path / "v2")


@pytest.mark.parametrize(
    "name, fault, symptom",
    [
        ("commit-refused", lambda hub: hub.refuse_next_commit(500), "the Hub answered HTTP 500"),
        ("died-mid-upload", lambda hub: hub.die_mid_upload(), "Error while uploading '.*weights.safetensors' to the Hub"),
    ],
)
def test_a_failed_push_leaves_the_remote_as_it_was_and_a_retry_succeeds(hub, tmp_path, monkeypatch, name, fault, symptom):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the client's back-off between upload retries
    repo_id = f"lib/{name}"
    push_folder(_write_model(tmp_path / "v1", 1), repo_id)
    refs_before = hub.refs(repo_id)
    v2 = _write_model(tmp_path / "v2", 2)  # new weights, so the push has LFS uploads to cut
    fault(hub)
    with pytest.raises(LorsaSurgeryError, match=rf"^Could not push .* to Hub repo '{repo_id}': .*{symptom}") as e:
        push_folder(v2, repo_id)
    assert "\n" not in str(e.value)
    assert hub.refs(repo_id) == refs_before
    hub.reset()
    info = push_folder(v2, repo_id)
    assert hub.refs(repo_id)["main"] == info.oid and _files(pull(repo_id)) == _files(v2)


def test_unknown_repo_or_revision_gives_a_clear_error(hub, tmp_path):
    with pytest.raises(LorsaSurgeryError, match="^Could not download Hub repo 'lib/no-such-repo': the repo does not exist"):
        pull("lib/no-such-repo")
    push_folder(_write_model(tmp_path / "src", 1), "lib/known")
    with pytest.raises(LorsaSurgeryError, match="at revision 'no-such-branch': that revision does not exist"):
        pull("lib/known", revision="no-such-branch")
    with pytest.raises(LorsaSurgeryError, match="has no folder 'layer9'"):
        pull("lib/known:layer9")
    with pytest.raises(LorsaSurgeryError, match="not a folder"):
        push_folder(tmp_path / "missing", "lib/known")


def test_the_token_never_appears_in_files_or_output(hub, tmp_path, capfd, monkeypatch):
    secret = "hf_SECRET_do_not_leak_4b1d"
    monkeypatch.setenv("HF_TOKEN", secret)  # the CLI takes the token from the environment
    hf_logging.set_verbosity_debug()  # the client's most talkative output must not carry it either
    try:
        src = _write_model(tmp_path / "src", 1)
        messages = [str(push_folder(src, "lib/token", token=secret))]
        hub.refuse_next_commit(500)
        with pytest.raises(LorsaSurgeryError) as e:
            push_folder(_write_model(tmp_path / "v2", 2), "lib/token", token=secret)
        messages.append(str(e.value))
        pull("lib/token", out_dir=tmp_path / "out")
        for args in (["push", str(src), "--repo-id", "lib/token"], ["pull", "lib/no-such-repo", "--out", str(tmp_path / "x")]):
            messages.append(CliRunner().invoke(main, args).output)
    finally:
        hf_logging.set_verbosity_warning()
    assert {r.headers.get("authorization") for r in hub.requests if r.path.startswith("/api/")} == {f"Bearer {secret}"}
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + "".join(messages)
    for root in (tmp_path, Path(os.environ["HF_HOME"])):
        leaked = [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == []


def test_transformers_loads_a_pushed_model_then_offline_from_the_cache_with_no_request(hub, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "tiny")
    push_folder(tmp_path / "tiny", "lib/tiny-llama")
    loaded = AutoModelForCausalLM.from_pretrained("lib/tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids).logits
    assert torch.equal(loaded(ids).logits, expected)

    # Offline mode is read when huggingface_hub is imported, hence a fresh process.
    snapshot = pull("lib/tiny-llama")
    hub.reset()
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from lorsa_surgery.hub import pull\n"
        "print(pull('lib/tiny-llama'))\n"
        "model = AutoModelForCausalLM.from_pretrained('lib/tiny-llama')\n"
        "torch.save(model(torch.tensor([[1, 2, 3, 4]])).logits, sys.argv[1])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logits.pt")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == snapshot
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert hub.requests == []


def test_cli_push_and_pull(hub, tmp_path):
    src = _write_model(tmp_path / "src", 1)
    runner = CliRunner()
    pushed = runner.invoke(main, ["push", str(src), "--repo-id", "lib/cli", "--commit-message", "from the CLI"])
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == f"{hub.url}/lib/cli/commit/{hub.refs('lib/cli')['main']}"
    commit = next(r for r in hub.requests if "/commit/" in r.path)
    assert commit.path == "/api/models/lib/cli/commit/main"

    proposed = runner.invoke(main, ["push", str(_write_model(tmp_path / "v2", 2)), "--repo-id", "lib/cli", "--create-pr"])
    assert proposed.exit_code == 0 and proposed.stdout.strip() == f"{hub.url}/lib/cli/discussions/1"

    pulled = runner.invoke(main, ["pull", "lib/cli", "--out", str(tmp_path / "out")])
    assert pulled.exit_code == 0 and Path(pulled.stdout.strip()) == tmp_path / "out"
    assert _files(tmp_path / "out") == _files(src)

    missing = runner.invoke(main, ["pull", "lib/no-such-repo", "--out", str(tmp_path / "none")])
    assert missing.exit_code != 0
    assert missing.stderr.strip().splitlines() == [
        "Error: Could not download Hub repo 'lib/no-such-repo': the repo does not exist, or your token cannot see it."
    ]
