"""The local Hub server (lorsa_surgery/io/hub_server.py) answers the real huggingface_hub client as the Hub does."""

import base64
import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256))  # binary, so it goes through LFS
README = b"---\nlicense: mit\n---\n# A model\n"


def _commit(api: HfApi, repo_id: str, files: dict[str, bytes], **kwargs):
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
    return api.create_commit(repo_id, operations, commit_message="test", **kwargs)


def _raw(hub, method: str, path: str, body: bytes = b"", chunked: bool = False, token: bool = True):
    """One request outside the client, for what the client never sends; returns (status, headers, body)."""
    conn = http.client.HTTPConnection(urlsplit(hub.url).netloc, timeout=10)
    headers = {"Authorization": "Bearer x"} if token else {}
    conn.request(method, path, body=iter([body]) if chunked else body, headers=headers, encode_chunked=chunked)
    response = conn.getresponse()
    answer = response.status, response.headers, response.read()
    conn.close()
    return answer


def test_create_repo_makes_an_initial_commit_and_answers_409_with_url_when_it_exists(hub):
    api = HfApi()
    url = api.create_repo("srv/create")
    info = api.repo_info("srv/create")
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert api.create_repo("srv/create", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("srv/create")
    assert e.value.response.status_code == 409


def test_regular_and_lfs_files_round_trip_with_hub_etags_and_tree(hub, tmp_path):
    api = HfApi()
    api.create_repo("srv/files")
    commit = _commit(api, "srv/files", {"README.md": README, "w.safetensors": WEIGHTS, "sub/deep/c.json": b"{}"})
    uploads = [r for r in hub.requests if r.method == "PUT"]
    assert len(uploads) == 1 and hashlib.sha256(WEIGHTS).hexdigest() in uploads[0].path  # only the weights via LFS

    tree = {f.path: f for f in api.list_repo_tree("srv/files", recursive=True)}
    assert set(tree) == {".gitattributes", "README.md", "w.safetensors", "sub", "sub/deep", "sub/deep/c.json"}
    assert tree["w.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert {f.path for f in api.list_repo_tree("srv/files")} == {".gitattributes", "README.md", "w.safetensors", "sub"}

    readme = get_hf_file_metadata(hf_hub_url("srv/files", "README.md"))
    assert readme.etag == hashlib.sha1(b"blob %d\0" % len(README) + README).hexdigest()  # git blob id
    assert readme.commit_hash == commit.oid and readme.size == len(README)
    weights = get_hf_file_metadata(hf_hub_url("srv/files", "w.safetensors"))
    assert weights.etag == hashlib.sha256(WEIGHTS).hexdigest() and weights.size == len(WEIGHTS)
    for path, data in [("README.md", README), ("w.safetensors", WEIGHTS), ("sub/deep/c.json", b"{}")]:
        assert Path(hf_hub_download("srv/files", path, cache_dir=tmp_path)).read_bytes() == data


def test_old_commits_stay_downloadable(hub, tmp_path):
    api = HfApi()
    api.create_repo("srv/history")
    first = _commit(api, "srv/history", {"w.safetensors": WEIGHTS})
    _commit(api, "srv/history", {"w.safetensors": WEIGHTS[::-1]})
    old = hf_hub_download("srv/history", "w.safetensors", revision=first.oid, cache_dir=tmp_path)
    new = hf_hub_download("srv/history", "w.safetensors", cache_dir=tmp_path)
    assert Path(old).read_bytes() == WEIGHTS and Path(new).read_bytes() == WEIGHTS[::-1]


def test_missing_repo_revision_and_file_raise_the_clients_own_errors(hub, tmp_path):
    api = HfApi()
    api.create_repo("srv/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("srv/no-such-repo")
    for revision in ["no-such-branch", "0" * 40]:
        with pytest.raises(RevisionNotFoundError):
            api.repo_info("srv/missing", revision=revision)
    with pytest.raises(RemoteEntryNotFoundError) as e:
        hf_hub_download("srv/missing", "config.json", cache_dir=tmp_path)
    assert e.value.response.headers["X-Repo-Commit"] == api.repo_info("srv/missing").sha


def test_commits_delete_files_and_folders(hub):
    api = HfApi()
    api.create_repo("srv/delete")
    _commit(api, "srv/delete", {"a.txt": b"a", "keep.txt": b"k", "sub/b.txt": b"b", "sub/deep/c.txt": b"c"})
    api.create_commit("srv/delete", [CommitOperationDelete("a.txt"), CommitOperationDelete("sub/")], commit_message="rm")
    assert api.list_repo_files("srv/delete") == [".gitattributes", "keep.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("srv/delete", [CommitOperationDelete("a.txt")], commit_message="rm again")


def test_stale_parent_commit_is_refused_with_412(hub):
    api = HfApi()
    api.create_repo("srv/stale")
    parent = api.repo_info("srv/stale").sha
    _commit(api, "srv/stale", {"a.txt": b"a"})
    with pytest.raises(HfHubHTTPError) as e:
        _commit(api, "srv/stale", {"b.txt": b"b"}, parent_commit=parent)
    assert e.value.response.status_code == 412


def test_commit_accepts_a_chunked_body_and_rejects_unknown_lfs_objects(hub):
    HfApi().create_repo("srv/raw")
    header = {"key": "header", "value": {"summary": "raw"}}
    regular = {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"hi").decode(), "encoding": "base64"}}
    unknown = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 3}}

    def ndjson(*lines):
        return b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    before = hub.refs("srv/raw")["main"]
    status, _, body = _raw(hub, "POST", "/api/models/srv/raw/commit/main", ndjson(header, unknown))
    assert status == 400 and hub.refs("srv/raw")["main"] == before
    status, _, body = _raw(hub, "POST", "/api/models/srv/raw/commit/main", ndjson(header, regular), chunked=True)
    assert status == 200 and hub.refs("srv/raw")["main"] == json.loads(body)["commitOid"]


def test_lfs_upload_checks_sha256_and_size_and_verify_knows_what_is_stored(hub):
    HfApi().create_repo("srv/lfs")
    objects = "/srv/lfs.git/info/lfs/objects"
    oid = hashlib.sha256(WEIGHTS).hexdigest()
    assert _raw(hub, "PUT", f"{objects}/{oid}/{len(WEIGHTS)}", WEIGHTS[:-1])[0] == 400
    assert _raw(hub, "PUT", f"{objects}/{'0' * 64}/{len(WEIGHTS)}", WEIGHTS)[0] == 400
    verify = json.dumps({"oid": oid, "size": len(WEIGHTS)}).encode()
    assert _raw(hub, "POST", f"{objects}/verify", verify)[0] == 404
    assert _raw(hub, "PUT", f"{objects}/{oid}/{len(WEIGHTS)}", WEIGHTS)[0] == 200
    assert _raw(hub, "POST", f"{objects}/verify", verify)[0] == 200


def test_branches_and_pull_requests_get_their_own_refs(hub, tmp_path):
    api = HfApi()
    api.create_repo("srv/refs")
    main = hub.refs("srv/refs")["main"]
    api.create_branch("srv/refs", branch="dev")
    assert hub.refs("srv/refs")["dev"] == main
    pr = _commit(api, "srv/refs", {"a.txt": b"proposed"}, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/srv/refs/discussions/1")
    assert hub.refs("srv/refs") == {"main": main, "dev": main, "refs/pr/1": pr.oid}
    got = hf_hub_download("srv/refs", "a.txt", revision="refs/pr/1", cache_dir=tmp_path)
    assert Path(got).read_bytes() == b"proposed"


def test_private_repos_are_hidden_without_a_token_and_writes_need_one(hub):
    HfApi().create_repo("srv/private", private=True)
    assert HfApi().repo_info("srv/private").private
    status, headers, _ = _raw(hub, "GET", "/api/models/srv/private", token=False)
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    body = json.dumps({"name": "anonymous", "organization": "srv"}).encode()
    assert _raw(hub, "POST", "/api/repos/create", body, token=False)[0] == 401


def test_every_request_is_logged_with_its_headers(hub):
    assert HfApi().whoami()["name"] == "lorsa-tester"
    [request] = hub.requests
    assert (request.method, request.path) == ("GET", "/api/whoami-v2")
    assert request.headers["authorization"] == f"Bearer {os.environ['HF_TOKEN']}"


def test_fault_switches_refuse_one_commit_and_cut_uploads_the_client_then_retries(hub, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the client's retry back-off
    api = HfApi()
    api.create_repo("srv/faults")
    hub.refuse_next_commit(403)
    with pytest.raises(HfHubHTTPError) as e:
        _commit(api, "srv/faults", {"a.txt": b"a"})
    assert e.value.response.status_code == 403
    _commit(api, "srv/faults", {"a.txt": b"a"})

    hub.die_mid_upload(times=1)
    _commit(api, "srv/faults", {"w.safetensors": WEIGHTS})
    assert [r.method for r in hub.requests].count("PUT") == 2  # the cut one, then the client's retry
    assert hub.repos["srv/faults"].lfs[hashlib.sha256(WEIGHTS).hexdigest()] == WEIGHTS


def test_server_runs_as_a_separate_process():
    server = subprocess.Popen([sys.executable, "-m", "lorsa_surgery.io.hub_server"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        request = urllib.request.Request(f"{url}/api/whoami-v2", headers={"Authorization": "Bearer x"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["name"] == "lorsa-tester"
    finally:
        server.terminate()
        server.wait(timeout=10)
