"""A small Hugging Face Hub in standard-library Python: for the tests, and for `lorsa-surgery demo` when no Hub is
configured.

The real `huggingface_hub` client and `transformers` talk to it on 127.0.0.1; the facts it respects
are the routes `_Handler` answers below. Model repos only. Everything lives in memory with every commit kept, so
an old commit stays downloadable after later pushes. Every request is logged (`requests`), and fault switches make
the server refuse commits, cut LFS uploads partway, refuse the token, fail chosen requests (echoing their headers, as
a careless proxy does, if asked), or take requests and never answer.

In-process: `hub = HubServer().start()`, then `hub.url`, ..., `hub.stop()`.
As a separate process: `python -m lorsa_surgery.io.hub_server [PORT]` prints its URL on the first line and
serves until killed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "lorsa-tester"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's threshold for sending a text file through LFS


def _git_blob_id(data: bytes) -> str:
    """Git's object id of a blob: the Hub's ETag for regular files and the `oid` in tree listings."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    size: int
    blob_id: str  # of the content, or of the LFS pointer for LFS files (as in git)
    sha256: str | None = None  # LFS files only


@dataclass
class _Repo:
    private: bool
    refs: dict[str, str]  # branch name or refs/pr/N -> commit oid
    commits: dict[str, dict[str, _File]]  # commit oid -> the files at that commit
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content of an uploaded LFS object
    prs: int = 0


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased


@dataclass
class _Fault:
    status: int
    times: int | None  # how many more requests fail; None: every one until reset()
    path: re.Pattern
    echo_headers: bool


@dataclass(frozen=True)
class _Call:
    """What a route needs from a request."""

    args: dict[str, str]  # the named parts of the path, unquoted
    query: dict[str, str]
    body: bytes
    authorized: bool

    def json(self) -> dict:
        return json.loads(self.body or b"{}")


@dataclass(frozen=True)
class _Blob:
    data: bytes
    headers: dict[str, str]


class _Answer(Exception):
    """An error answer. `code` goes to X-Error-Code, which the client turns into specific exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.headers, self.body = status, dict(headers or {}), {"error": message, **body}
        self.headers["X-Error-Message"] = message
        if code:
            self.headers["X-Error-Code"] = code


class HubServer:
    """The Hub's state and the HTTP server serving it. `start()` serves 127.0.0.1 (a free port by default)."""

    def __init__(self, port: int = 0):
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.lock = threading.Lock()
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git blob id -> content of a regular file
        self._released = threading.Event()  # cleared while the server hangs
        self.reset()

    def start(self) -> HubServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        """Turn the fault switches off and clear the request log; repos are kept."""
        with self.lock:
            self.requests: list[Request] = []
            self._refused_commit_status = 500
            self._commits_to_refuse: int | None = 0
            self._uploads_to_cut: int | None = 0
            self._refuse_tokens = False
            self._fault: _Fault | None = None
            self._hang_seconds = 0.0
            self._released.set()

    def refuse_next_commit(self, status: int = 500, times: int | None = 1) -> None:
        """Answer the next `times` commits (every one until `reset()` when None) with `status` instead of applying them."""
        with self.lock:
            self._refused_commit_status, self._commits_to_refuse = status, times

    def fail(self, status: int = 500, times: int | None = None, path: str = "", echo_headers: bool = False) -> None:
        """Answer the next `times` requests (every one until `reset()` when None) whose path and query match the regex
        `path` with HTTP `status`. With `echo_headers` the answer is plain text repeating the request line and headers,
        token included, as a careless proxy's error page does."""
        with self.lock:
            self._fault = _Fault(status, times, re.compile(path), echo_headers)

    def hang(self, seconds: float = 30.0) -> None:
        """Take every request and answer none: each waits `seconds` (or until `reset()`), then its connection is
        dropped unanswered. A Hub that accepts connections and never answers."""
        with self.lock:
            self._hang_seconds = seconds
            self._released.clear()

    def refuse_tokens(self) -> None:
        """Answer every request 401 (a revoked or wrong token) until `reset()`."""
        with self.lock:
            self._refuse_tokens = True

    def die_mid_upload(self, times: int | None = None) -> None:
        """Drop the connection halfway through the next `times` LFS uploads (every one until `reset()` when None).

        The client retries a dropped upload several times, so a push fails only when every try is cut.
        """
        with self.lock:
            self._uploads_to_cut = times

    def refs(self, repo_id: str) -> dict[str, str]:
        """Branches and refs/pr/N of a repo, each with the commit it points to."""
        with self.lock:
            return dict(self.repos[repo_id].refs)

    def _fault_for(self, path: str) -> _Fault | None:
        with self.lock:
            fault = self._fault
            if fault is None or fault.times == 0 or not fault.path.search(path):
                return None
            if fault.times is not None:
                fault.times -= 1
            return fault

    def _cut_this_upload(self) -> bool:
        with self.lock:
            if self._uploads_to_cut == 0:
                return False
            if self._uploads_to_cut is not None:
                self._uploads_to_cut -= 1
            return True

    # Routes: each runs under `lock`, returns a JSON-able answer (or a _Blob) or raises _Answer.

    def _repo(self, call: _Call, authorized: bool = False) -> _Repo:
        repo = self.repos.get(call.args["repo"])
        if repo is None or (repo.private and not (call.authorized or authorized)):
            raise _Answer(404, f"Repository {call.args['repo']} not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_at(repo: _Repo, rev: str) -> str:
        # A revision is a commit only when it is 40 hex characters, as on the Hub.
        oid = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else repo.refs.get(rev)
        if oid not in repo.commits:
            raise _Answer(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    def whoami(self, call: _Call) -> dict:
        return {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}}

    def validate_yaml(self, call: _Call) -> dict:
        return {"errors": [], "warnings": []}

    def create_repo(self, call: _Call) -> dict:
        body = call.json()
        if body.get("type") not in (None, "model"):
            raise _Answer(400, "This test server only hosts model repos")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise _Answer(409, "You already created this model repo", url=url)
        oid = secrets.token_hex(20)
        self.blobs[_git_blob_id(_GITATTRIBUTES)] = _GITATTRIBUTES
        files = {".gitattributes": _File(len(_GITATTRIBUTES), _git_blob_id(_GITATTRIBUTES))}
        private = body.get("visibility") == "private" or body.get("private") is True
        self.repos[repo_id] = _Repo(private, {"main": oid}, {oid: files})
        return {"url": url, "name": repo_id, "id": repo_id}

    def repo_info(self, call: _Call) -> dict:
        repo = self._repo(call)
        oid = self._commit_at(repo, call.args["rev"] or "main")
        siblings = [{"rfilename": path} for path in sorted(repo.commits[oid])]
        return {"id": call.args["repo"], "modelId": call.args["repo"], "sha": oid, "private": repo.private, "siblings": siblings}

    def tree(self, call: _Call) -> list:
        repo = self._repo(call)
        files = repo.commits[self._commit_at(repo, call.args["rev"])]
        path = (call.args["path"] or "").strip("/")
        recursive = call.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        entries, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            levels = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(levels))
            if recursive or len(parts) == 1:
                entries.append(self._tree_entry(name, files[name]))
        if path and not entries and not folders:
            raise _Answer(404, f"{path} does not exist at {call.args['rev']}", "EntryNotFound")
        dirs = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0} for d in sorted(folders)]
        return dirs + entries

    @staticmethod
    def _tree_entry(path: str, f: _File) -> dict:
        entry = {"type": "file", "path": path, "oid": f.blob_id, "size": f.size}
        if f.sha256:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
        return entry

    def preupload(self, call: _Call) -> dict:
        repo = self._repo(call)
        head = self._commit_at(repo, call.args["rev"])
        answers = []
        for f in call.json()["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(".safetensors") or f["size"] >= _LFS_MIN_SIZE or b"\0" in sample
            # The client skips files whose remote oid equals its own (sha256 for LFS, git blob id otherwise).
            remote = repo.commits[head].get(f["path"])
            oid = remote and (remote.sha256 or remote.blob_id)
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": answers, "commitOid": head}

    def create_branch(self, call: _Call) -> dict:
        repo, branch = self._repo(call), call.args["branch"]
        if branch.startswith("refs/"):
            raise _Answer(400, f"Invalid branch name: {branch}")
        if branch in repo.refs:
            raise _Answer(409, f"Branch {branch} already exists")
        repo.refs[branch] = self._commit_at(repo, call.json().get("startingPoint") or "main")
        return {}

    def lfs_batch(self, call: _Call) -> dict:
        repo = self._repo(call)
        base = f"{self.url}/{call.args['repo']}.git/info/lfs/objects"
        objects = []
        for obj in call.json()["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in repo.lfs:  # stored already: no actions, so the client skips the upload
                objects.append({"oid": oid, "size": size})
            else:
                actions = {"upload": {"href": f"{base}/{oid}/{size}"}, "verify": {"href": f"{base}/verify"}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, call: _Call) -> dict:
        repo, oid = self._repo(call, authorized=True), call.args["oid"]  # upload URLs stand for a token
        if len(call.body) != int(call.args["size"]) or hashlib.sha256(call.body).hexdigest() != oid:
            raise _Answer(400, "Uploaded bytes do not match the announced sha256 and size")
        repo.lfs[oid] = call.body
        return {}

    def lfs_verify(self, call: _Call) -> dict:
        repo, body = self._repo(call), call.json()
        if body["oid"] not in repo.lfs or len(repo.lfs[body["oid"]]) != body["size"]:
            raise _Answer(404, f"LFS object {body['oid']} is not stored")
        return {}

    def commit(self, call: _Call) -> dict:
        repo, rev = self._repo(call), call.args["rev"]
        if self._commits_to_refuse != 0:
            if self._commits_to_refuse is not None:
                self._commits_to_refuse -= 1
            raise _Answer(self._refused_commit_status, "Commit refused by the test server (fault injection)")
        if rev not in repo.refs:
            raise _Answer(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in call.body.splitlines() if line.strip()]
        parent = repo.refs[rev]
        if lines[0]["value"].get("parentCommit") not in (None, parent):
            raise _Answer(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent])  # changed on a copy, so a rejected commit changes nothing
        for line in lines[1:]:
            op, path = line["key"], line["value"]["path"]
            if op == "file":
                data = base64.b64decode(line["value"]["content"])
                self.blobs[_git_blob_id(data)] = data
                files[path] = _File(len(data), _git_blob_id(data))
            elif op == "lfsFile":
                oid = line["value"]["oid"]
                if oid not in repo.lfs:
                    raise _Answer(400, f"Unknown LFS object {oid} for {path}: upload it first")
                size = len(repo.lfs[oid])
                files[path] = _File(size, _git_blob_id(_lfs_pointer(oid, size)), oid)
            elif op == "deletedFile":
                if files.pop(path, None) is None:
                    raise _Answer(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif op == "deletedFolder":
                inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not inside:
                    raise _Answer(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del files[p]
            else:
                raise _Answer(400, f"Unknown commit operation {op!r}")
        oid = secrets.token_hex(20)
        repo.commits[oid] = files
        pr_url = None
        if call.query.get("create_pr") == "1":
            repo.prs += 1
            rev, pr_url = f"refs/pr/{repo.prs}", f"{self.url}/{call.args['repo']}/discussions/{repo.prs}"
        repo.refs[rev] = oid
        commit_url = f"{self.url}/{call.args['repo']}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": pr_url}

    def resolve(self, call: _Call) -> _Blob:
        repo = self._repo(call)
        oid = self._commit_at(repo, call.args["rev"])
        f = repo.commits[oid].get(call.args["path"])
        if f is None:
            # The commit header lets the client cache the absence (transformers probes optional files).
            raise _Answer(404, f"Entry not found: {call.args['path']}", "EntryNotFound", {"X-Repo-Commit": oid})
        if f.sha256:
            etag = f'"{f.sha256}"'
            return _Blob(repo.lfs[f.sha256], {"X-Repo-Commit": oid, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(f.size)})
        return _Blob(self.blobs[f.blob_id], {"X-Repo-Commit": oid, "ETag": f'"{f.blob_id}"'})


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # (methods, path pattern, HubServer method, whether a token is required)
    (("GET",), r"/api/whoami-v2", HubServer.whoami, True),
    (("POST",), r"/api/validate-yaml", HubServer.validate_yaml, False),
    (("POST",), r"/api/repos/create", HubServer.create_repo, True),
    (("GET",), rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", HubServer.repo_info, False),
    (("GET",), rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", HubServer.tree, False),
    (("POST",), rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", HubServer.preupload, True),
    (("POST",), rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", HubServer.create_branch, True),
    (("POST",), rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", HubServer.commit, True),
    (("POST",), rf"/{_REPO}\.git/info/lfs/objects/batch", HubServer.lfs_batch, True),
    (("POST",), rf"/{_REPO}\.git/info/lfs/objects/verify", HubServer.lfs_verify, True),
    # Upload URLs are presigned on the Hub: the client sends no token with them.
    (("PUT",), rf"/{_REPO}\.git/info/lfs/objects/(?P<oid>[0-9a-f]{{64}})/(?P<size>\d+)", HubServer.lfs_put, False),
    (("GET", "HEAD"), rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", HubServer.resolve, False),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

    def log_message(self, format, *args) -> None:
        pass  # the request log replaces stderr noise

    def _handle(self) -> None:
        hub: HubServer = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        with hub.lock:
            hub.requests.append(Request(self.command, self.path, headers))
        if not hub._released.is_set():
            hub._released.wait(hub._hang_seconds)
            self.close_connection = True  # dropped unanswered
            return
        if self.command == "PUT" and hub._cut_this_upload():
            return self._drop_midway()
        body = self._read_body()
        url = urlsplit(self.path)
        fault = hub._fault_for(self.path)
        if fault is not None and fault.echo_headers:
            return self._send(fault.status, f"{self.requestline}\n{self.headers}".encode(), {"Content-Type": "text/plain"})
        try:
            with hub.lock:
                if fault is not None:
                    raise _Answer(fault.status, "Request failed by the test server (fault injection)")
                if hub._refuse_tokens:
                    raise _Answer(401, "Invalid credentials in Authorization header")
                answer = self._route(hub, url.path, url.query, body, headers.get("authorization", "").startswith("Bearer "))
            status, extra = 200, {}
        except _Answer as e:
            answer, status, extra = e.body, e.status, e.headers
        if isinstance(answer, _Blob):
            return self._send(status, answer.data, {"Content-Type": "application/octet-stream", **answer.headers})
        content_type = "application/vnd.git-lfs+json" if ".git/info/lfs/" in url.path else "application/json"
        self._send(status, json.dumps(answer).encode(), {"Content-Type": content_type, **extra})

    do_GET = do_HEAD = do_POST = do_PUT = _handle

    def _route(self, hub: HubServer, path: str, query: str, body: bytes, authorized: bool) -> object:
        for methods, pattern, route, needs_token in _ROUTES:
            if self.command in methods and (m := re.fullmatch(pattern, path)):
                if needs_token and not authorized:
                    raise _Answer(401, "Invalid credentials in Authorization header")
                args = {k: v and unquote(v) for k, v in m.groupdict().items()}
                return route(hub, _Call(args, {k: v[-1] for k, v in parse_qs(query).items()}, body, authorized))
        raise _Answer(501, f"{self.command} {path} is not implemented by the test Hub")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF closing the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop_midway(self) -> None:
        # Read part of the body, then close with the rest unread: the client sees a reset connection.
        self.rfile.read1(max(1, int(self.headers.get("Content-Length") or 2) // 2))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


if __name__ == "__main__":
    server = HubServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.url, flush=True)
    server.serve_forever()
