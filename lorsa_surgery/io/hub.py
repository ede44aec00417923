"""Publishing a folder to the Hugging Face Hub and fetching one back, whatever the folder holds.

A push is one commit: the folder's files are uploaded first and committed together, so a push that
fails leaves the remote repo at its previous commit. A pull into a folder is written whole: a pull that fails
leaves that folder as it was. Every request has a timeout, and a call that meets a hiccup (the Hub unreachable,
slow, busy or failing with 5xx) is tried again a few times. Errors from `huggingface_hub` become one-line
`LorsaSurgeryError`s naming the repo, with anything that looks like a token removed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_session, get_token, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError

# What a failed Hub call raises: HTTP errors and local cache misses (OSError), invalid repo ids and
# malformed answers (ValueError), an upload cut short (RuntimeError), a dropped connection (httpx2).
HUB_FAILURES = (OSError, ValueError, RuntimeError, httpx2.HTTPError)

LOCAL_HINT = ".lorsa_surgery.local.json"
"""The file in a patched-model folder that says where its local base lives on this machine; never uploaded."""

TIMEOUT: float = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or 8)
"""Seconds any Hub request may wait to connect or for the next bytes ($HF_HUB_DOWNLOAD_TIMEOUT sets it)."""
TRIES = 3
"""Tries of a Hub call in all, when the earlier ones met a hiccup."""
BACKOFF: float = 1.0
"""Seconds before the second try; doubled before each later one. With TIMEOUT, a Hub that never answers fails a
call in about TRIES * TIMEOUT + 3 * BACKOFF seconds."""

T = TypeVar("T")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload every file of `folder` to the model repo `repo_id` as one commit; return its commit info.

    Creates the repo if needed (`private` applies only then) and the branch `revision` from main if it
    does not exist. With `create_pr`, the commit opens a pull request (`refs/pr/N`, see
    `CommitInfo.pr_revision`) instead of moving the branch. Files are added or replaced; remote files
    absent from the folder are kept. Local hints and lorsa-surgery's folder markers are never uploaded, at any
    depth. `token` defaults to the usual `huggingface_hub` token, `endpoint` to $HF_ENDPOINT as `huggingface_hub`
    read it on import.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LorsaSurgeryError(f"Cannot push '{folder}': it is not a folder.")
    found = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (LOCAL_HINT, files.MARKER)  # they describe this machine, not the model
    }
    # Skip what git and `snapshot_download(local_dir=...)` keep beside the files (.git, .cache/huggingface).
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=found[name])
        for name in filter_repo_objects(found, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    ]
    if not operations:
        raise LorsaSurgeryError(f"Cannot push '{folder}': it holds no files.")
    api = HfApi(token=token, endpoint=endpoint)

    def push() -> CommitInfo:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.resolve().name} with lorsa-surgery",
            revision=revision,
            create_pr=create_pr,
        )

    return _hub_call(f"Could not push '{folder}' to Hub repo '{repo_id}'", push, token)


def pull(
    source: str | os.PathLike,
    revision: str | None = None,
    out_dir: str | os.PathLike | None = None,
    allow_patterns: str | list[str] | None = None,
    *,
    overwrite: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Return a local folder holding `source`: a local folder (as it is), `org/repo`, or `org/repo:subfolder`.

    Hub repos are fetched with `snapshot_download` at `revision` (branch, tag or commit; default main)
    into the Hugging Face cache, or into `out_dir` when given: written whole, so a failed pull leaves it as it
    was; one that holds an earlier lorsa-surgery result is replaced only with `overwrite`. For `org/repo:subfolder`
    only that subfolder is fetched and the returned path points into it; `allow_patterns` (relative to the
    subfolder) narrows the files further. With `HF_HUB_OFFLINE=1` the cache answers and no request is made.
    `token` and `endpoint` as in `push_folder`.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise LorsaSurgeryError(f"{source} is a file, not a folder.")
    repo_id, _, subfolder = str(source).partition(":")
    if str(source).startswith((".", "/", "~")) or not _is_repo_id(repo_id):  # a path, never a repo id
        raise LorsaSurgeryError(f"Missing folder: {source}.")
    subfolder = subfolder.rstrip("/")
    if subfolder:  # refused before any request; the folder it names is checked again once downloaded
        files.inside(repo_id, subfolder, what=f"The subfolder in '{source}'")
    if revision is not None and (".." in revision or revision.startswith("/")):
        # the cache keeps a file per revision name: such a name would put it outside the cache
        raise LorsaSurgeryError(f"'{revision}' is not a branch, tag or commit name.")
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns or ["*"]]
    where = f"Hub repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")

    def fetch(local_dir: Path | None) -> Path:
        root = _hub_call(
            f"Could not download {where}",
            lambda: snapshot_download(
                repo_id, revision=revision, local_dir=local_dir, allow_patterns=patterns, token=token, endpoint=endpoint
            ),
            token,
        )
        folder = files.inside(root, subfolder or ".", what=f"The subfolder of {where}")
        if not folder.is_dir():
            raise LorsaSurgeryError(f"{where} has no folder '{subfolder}'.")
        return folder

    if out_dir is None:
        return fetch(None)
    with files.new_folder(out_dir, overwrite=overwrite, kind="pulled-repo") as staging:
        fetch(staging)
    return Path(out_dir, subfolder)


def _is_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id of the form NS/NAME (the only form `pull` fetches)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def _hub_call(what: str, call: Callable[[], T], token: str | None) -> T:
    """`call()`, tried again after a hiccup, TRIES times in all; a failure becomes a LorsaSurgeryError led by `what`."""
    _bound_session()
    tries = 1
    while True:
        try:
            return call()
        except HUB_FAILURES as err:
            if tries >= TRIES or not _worth_retrying(err):
                raise hub_error(what, err, token) from err
        time.sleep(BACKOFF * 2 ** (tries - 1))
        tries += 1


def _bound_session() -> None:
    """Give every request of `huggingface_hub`'s shared client a timeout (it sends most with none at all, so a Hub
    that accepts the connection and never answers would hang a call forever). The client is rebuilt after a fork or
    a new client factory, hence a check on each call."""
    hooks = get_session().event_hooks["request"]
    if _cap_timeouts not in hooks:
        hooks.append(_cap_timeouts)


def _cap_timeouts(request: httpx2.Request) -> None:
    asked = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        phase: TIMEOUT if asked.get(phase) is None else min(asked[phase], TIMEOUT)
        for phase in ("connect", "read", "write", "pool")
    }


def _worth_retrying(err: BaseException | None) -> bool:
    """Whether another try may succeed where `err` failed: the Hub was unreachable, slow, busy (429) or failing
    (5xx). A commit that may have landed is not sent again: a second one could open a second pull request."""
    while err is not None:
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code
            return status == 429 or (status >= 500 and not _is_commit(err.response))
        if isinstance(err, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return True  # nothing was sent
        if isinstance(err, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
            return not _is_commit(err)
        err = err.__cause__  # huggingface_hub wraps failures ("Error while uploading ...", a cache miss)
    return False


def _is_commit(failed: httpx2.Response | httpx2.RequestError) -> bool:
    try:
        request = failed.request
    except RuntimeError:  # httpx2 raises when no request is attached
        return False
    return request.method == "POST" and "/commit/" in request.url.path


def hub_error(what: str, err: Exception, token: str | None = None) -> LorsaSurgeryError:
    """`what` plus the reason behind `err`, on one line, without anything that looks like a token (`token`, the
    configured one, bearer credentials, hf_... strings): a proxy may echo the request's headers in its answer."""
    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        err = err.__cause__  # snapshot_download reports every failure as a cache miss: say what the Hub did
    if isinstance(err, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE=1 forbids network access"
    elif isinstance(err, RepositoryNotFoundError):
        why = "the repo does not exist, or your token cannot see it"
    elif isinstance(err, RevisionNotFoundError):
        why = "that revision does not exist"
    elif isinstance(err, LocalEntryNotFoundError):
        offline = "HF_HUB_OFFLINE=1 forbids network access" if constants.is_offline_mode() else "the Hub cannot be reached"
        why = f"the files are not in the local cache and {offline}"
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {err.response.status_code} ({err.server_message or err.response.reason_phrase})"
    elif isinstance(err, httpx2.TimeoutException):
        why = f"the Hub at {_origin(err)} did not answer within {TIMEOUT:g} s"
    elif isinstance(err, httpx2.ConnectError):
        why = f"the Hub at {_origin(err)} cannot be reached ({err})"
    else:  # a transport failure arrives wrapped (e.g. "Error while uploading ..."): its root says what broke
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        why = f"{str(err).rstrip('.')} ({type(root).__name__}: {root})" if root is not err else f"{type(err).__name__}: {err}"
    message = _scrub(" ".join(f"{what}: {why}".split()), token)
    if len(message) > _MAX_MESSAGE:  # an error page echoed whole is not one line
        message = message[: _MAX_MESSAGE - 1].rstrip() + "…"
    return LorsaSurgeryError(message.rstrip(".") + ".")


_MAX_MESSAGE = 400
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}|\bhf_[A-Za-z0-9]{20,}")


def _scrub(text: str, token: str | None) -> str:
    """`text` with tokens and credentials replaced by ***."""
    for secret in {token, get_token()}:
        if secret and len(secret) >= 8:  # a shorter "token" would blank ordinary words
            text = text.replace(secret, "***")
    return _CREDENTIALS.sub(lambda m: f"{m[1]} ***" if m[1] else "***", text)


def _origin(err: httpx2.RequestError) -> str:
    try:
        url = err.request.url
    except RuntimeError:  # httpx2 raises when no request is attached
        return constants.ENDPOINT
    return f"{url.scheme}://{url.netloc.decode()}"


_bound_session()  # now too, for callers that use huggingface_hub directly after importing this module (cli/loading.py)
