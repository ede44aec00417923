"""Publishing folders to the Hub and fetching them back (lorsa_surgery.io.hub, `lorsa-surgery push/pull`).

Everything runs against the local Hub server started in conftest.py, through the real client.
"""

import ast
import json
import os
import re
import socket
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
from lorsa_surgery.io import hub as hub_module
from lorsa_surgery.cli import main
from lorsa_surgery.io.files import MARKER
from lorsa_surgery.io.hub import LOCAL_HINT, hub_error, pull, push_folder


def _write_model(folder: Path, version: int) -> Path:
    """A folder shaped like a published model: weights, a model card, and one folder per layer."""
    for layer in (0, 1):
        (folder / f"layer{layer}").mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4, 4), float(version + layer))}, folder / f"layer{layer}" / "weights.safetensors")
        (folder / f"layer{layer}" / "config.json").write_text(json.dumps({"layer": layer, "version": version}))
    (folder / "README.md").write_text(f"---\nlibrary_name: lorsa-surgery\ntags: [lorsa]\n---\n# Version {version}\n")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    """The folder's files by relative path, without the repo's .gitattributes, the client's .cache and the marker of
    a folder lorsa-surgery wrote."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (".gitattributes", MARKER) and ".cache" not in p.relative_to(folder).parts
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
        "from lorsa_surgery.io.hub import pull\n"
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


# ---- Hub faults, hostile sources, interrupted pulls ----------------------------------------------------------------


@pytest.fixture
def quick_retries(monkeypatch):
    """Hub calls that give up fast: 1 s timeouts and no waiting between tries (the client's own back-off included)."""
    monkeypatch.setattr(hub_module, "TIMEOUT", 1.0)
    monkeypatch.setattr(hub_module, "BACKOFF", 0.0)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def test_a_hub_that_never_answers_fails_pull_and_push_in_bounded_time(hub, tmp_path, quick_retries):
    src = _write_model(tmp_path / "src", 1)
    hub.hang(seconds=30)  # then the server drops the connection: without timeouts a call waits that long
    for call in (lambda: pull("lib/hung", out_dir=tmp_path / "out"), lambda: push_folder(src, "lib/hung")):
        start = time.monotonic()
        with pytest.raises(LorsaSurgeryError, match=r"'lib/hung': the Hub at http://127\.0\.0\.1:\d+ did not answer within 1 s\.$"):
            call()
        assert time.monotonic() - start < hub_module.TRIES * hub_module.TIMEOUT + 3
    assert len(hub.requests) == 2 * hub_module.TRIES  # each call tried its first request TRIES times, then gave up
    assert not (tmp_path / "out").exists()


def test_hiccups_are_tried_again_a_few_times_and_refusals_never(hub, tmp_path, quick_retries):
    src = _write_model(tmp_path / "src", 1)
    hub.fail(503, times=1)  # the first request: creating the repo
    push_folder(src, "lib/hiccup")
    assert _commits(hub) == 1
    hub.reset()
    hub.fail(429, times=hub_module.TRIES - 1, path="^/api/models/")
    assert _files(pull("lib/hiccup", out_dir=tmp_path / "out")) == _files(src)

    for status, tries in ((500, hub_module.TRIES), (403, 1)):
        hub.reset()
        hub.fail(status)
        with pytest.raises(LorsaSurgeryError, match=rf"^Could not download Hub repo 'lib/hiccup': the Hub answered HTTP {status} \("):
            pull("lib/hiccup", out_dir=tmp_path / "none")
        assert len(hub.requests) == tries  # the repo's info, asked again only after a 5xx
        hub.reset()
        hub.fail(status)
        with pytest.raises(LorsaSurgeryError, match=rf"^Could not push .* to Hub repo 'lib/hiccup': the Hub answered HTTP {status} \("):
            push_folder(src, "lib/hiccup")
        assert sum(r.path == "/api/repos/create" for r in hub.requests) == tries
    assert not (tmp_path / "none").exists()

    hub.reset()
    hub.refuse_next_commit(503, times=None)
    with pytest.raises(LorsaSurgeryError, match="the Hub answered HTTP 503"):
        push_folder(_write_model(tmp_path / "v2", 2), "lib/hiccup")
    assert _commits(hub) == 1  # a commit that may have landed is not sent again


def test_an_error_page_echoing_the_request_headers_never_shows_the_token(hub, tmp_path, monkeypatch, quick_retries):
    configured, given = "hf_CONFIGURED_secret_7c3e", "custom-GIVEN-secret-9d2f"
    monkeypatch.setenv("HF_TOKEN", configured)
    monkeypatch.setattr(hub_module, "_MAX_MESSAGE", 10_000)  # the whole echo, to see its token is gone
    src = _write_model(tmp_path / "src", 1)
    hub.fail(500, echo_headers=True)
    messages = []
    for call in (lambda: pull("lib/echo", out_dir=tmp_path / "out"), lambda: push_folder(src, "lib/echo", token=given)):
        with pytest.raises(LorsaSurgeryError, match="the Hub answered HTTP 500") as e:
            call()
        messages.append(str(e.value))
    messages.append(CliRunner().invoke(main, ["pull", "lib/echo", "--out", str(tmp_path / "cli")]).output)
    assert {r.headers.get("authorization") for r in hub.requests} == {f"Bearer {configured}", f"Bearer {given}"}
    for message in messages:
        assert re.search(r"(?i)authorization: bearer \*\*\*", message), message  # the echo is there, its token not
        assert configured not in message and given not in message and "\n" not in message.strip()


def test_hub_errors_scrub_anything_that_looks_like_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env_token_abcdef")
    real_shape = "hf_" + "aB3" * 12
    err = RuntimeError(
        "proxy said: Authorization: Bearer opaque.jwt.value; Proxy-Authorization: Basic dXNlcjpwYXNz; "
        f"X-Token: {real_shape}; env=hf_env_token_abcdef; given=given-token-123"
    )
    message = str(hub_error("Could not push", err, token="given-token-123"))
    assert message.startswith("Could not push: RuntimeError: proxy said: Authorization: Bearer ***; ")
    for secret in ("opaque.jwt.value", "dXNlcjpwYXNz", real_shape, "hf_env_token_abcdef", "given-token-123"):
        assert secret not in message


def test_a_missing_local_folder_is_reported_as_missing_not_as_a_hub_failure(hub, tmp_path, monkeypatch, quick_retries):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for source in ("./missing", str(tmp_path / "missing"), "~/missing", "missing_folder", "a/b/c", "a/b/c:layer0"):
        with pytest.raises(LorsaSurgeryError, match=rf"^Missing folder: {re.escape(source)}\.$"):
            pull(source)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LorsaSurgeryError, match=r"^a\.txt is a file, not a folder\.$"):
        pull("a.txt")
    (tmp_path / "there").mkdir()
    assert pull("~/there") == tmp_path / "there"
    result = CliRunner().invoke(main, ["pull", "missing_folder", "--out", "out"])
    assert result.exit_code == 1 and result.stderr.strip() == "Error: Missing folder: missing_folder."
    assert hub.requests == []

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LorsaSurgeryError, match=rf"^Could not download Hub repo 'lib/x': the Hub at http://127\.0\.0\.1:{port} cannot be reached \("):
        pull("lib/x", out_dir=tmp_path / "out", endpoint=f"http://127.0.0.1:{port}")


def test_pull_refuses_subfolders_and_revisions_that_leave_the_repo_before_any_request(hub, tmp_path):
    out = tmp_path / "out"
    for source in ("lib/x:../../x", "lib/x:/etc", "lib/x:layer0/../../x", "lib/x:.."):
        with pytest.raises(LorsaSurgeryError, match=r"leads outside lib/x; refused\.$"):
            pull(source, out_dir=out)
    with pytest.raises(LorsaSurgeryError, match=r"^'\.\./\.\./x' is not a branch, tag or commit name\.$"):
        pull("lib/x", revision="../../x", out_dir=out)
    result = CliRunner().invoke(main, ["pull", "lib/x:../../x", "--out", str(out)])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "Error: The subfolder in 'lib/x:../../x' ('../../x') leads outside lib/x; refused."
    ]
    assert hub.requests == [] and not out.exists()


def test_a_downloaded_subfolder_that_links_out_of_the_download_is_refused(hub, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")

    def tampered_download(repo_id, local_dir=None, **kwargs):  # a snapshot whose subfolder leads elsewhere
        root = Path(local_dir or tmp_path / "snapshot")
        root.mkdir(exist_ok=True)
        (root / "sub").symlink_to(elsewhere, target_is_directory=True)
        return str(root)

    monkeypatch.setattr(hub_module, "snapshot_download", tampered_download)
    for out in (None, tmp_path / "out"):
        with pytest.raises(LorsaSurgeryError, match=r"^The subfolder of Hub repo 'lib/linked' \('sub'\) leads outside .* through a symbolic link; refused\.$"):
            pull("lib/linked:sub", out_dir=out)
    assert not (tmp_path / "out").exists()


def test_a_pull_that_fails_part_way_leaves_out_as_it_was(hub, tmp_path):
    v1, v2 = _write_model(tmp_path / "v1", 1), _write_model(tmp_path / "v2", 2)
    push_folder(v1, "lib/partial")
    out = tmp_path / "out"
    hub.fail(403, path="/resolve/.*/layer1/")
    with pytest.raises(LorsaSurgeryError, match=r"^Could not download Hub repo 'lib/partial': the Hub answered HTTP 403"):
        pull("lib/partial", out_dir=out)
    assert any(r.method == "GET" and "/layer0/" in r.path for r in hub.requests)  # files came before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v2"]  # no out, no staging left beside it

    hub.reset()
    assert _files(pull("lib/partial", out_dir=out)) == _files(v1)
    push_folder(v2, "lib/partial")
    hub.fail(403, path="/resolve/.*/layer1/")
    with pytest.raises(LorsaSurgeryError, match="HTTP 403"):
        pull("lib/partial", out_dir=out, overwrite=True)
    assert _files(out) == _files(v1)  # the earlier pull, whole

    hub.reset()
    with pytest.raises(LorsaSurgeryError, match="earlier lorsa-surgery result; pass --overwrite"):
        pull("lib/partial", out_dir=out)
    runner = CliRunner()
    assert runner.invoke(main, ["pull", "lib/partial", "--out", str(out)]).exit_code == 1
    replaced = runner.invoke(main, ["pull", "lib/partial", "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and _files(out) == _files(v2)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("not ours")
    hub.reset()
    with pytest.raises(LorsaSurgeryError, match="did not write"):
        pull("lib/partial", out_dir=theirs, overwrite=True)
    assert [p.name for p in theirs.iterdir()] == ["thesis.txt"] and hub.requests == []


def test_push_never_uploads_local_hints_or_folder_markers_at_any_depth(hub, tmp_path):
    src = _write_model(tmp_path / "src", 1)
    for folder in (src, src / "layer0", src / "nested" / "patched"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOCAL_HINT).write_text(json.dumps({"base_path": "/home/me/base"}))
        (folder / MARKER).write_text("{}")
    (src / "nested" / "patched" / "lorsa_surgery.json").write_text("{}")
    push_folder(src, "lib/hints")
    remote = HfApi().list_repo_files("lib/hints")
    assert "nested/patched/lorsa_surgery.json" in remote
    assert [name for name in remote if name.rsplit("/", 1)[-1] in (LOCAL_HINT, MARKER)] == []


def test_the_hub_module_does_not_import_patched_models():
    tree = ast.parse(Path(hub_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    assert not [name for name in imported if name and name.endswith("patched")]
    from lorsa_surgery.publishing import patched

    assert patched.LOCAL_HINT == LOCAL_HINT  # one file name, wherever it is read
