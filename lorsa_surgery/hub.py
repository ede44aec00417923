"""Publishing a folder to the Hugging Face Hub and fetching one back, whatever the folder holds.

A push is one commit: the folder's files are uploaded first and committed together, so a push that
fails leaves the remote repo at its previous commit. Errors from `huggingface_hub` become one-line
`LorsaSurgeryError`s naming the repo; the token never appears in them.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from lorsa_surgery.errors import LorsaSurgeryError

# What a failed Hub call raises: HTTP errors and local cache misses (OSError), invalid repo ids and
# malformed answers (ValueError), an upload cut short (RuntimeError), a dropped connection (httpx2).
HUB_FAILURES = (OSError, ValueError, RuntimeError, httpx2.HTTPError)


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
    absent from the folder are kept. `token` defaults to the usual `huggingface_hub` token, `endpoint` to
    $HF_ENDPOINT as `huggingface_hub` read it on import.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LorsaSurgeryError(f"Cannot push '{folder}': it is not a folder.")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    from lorsa_surgery.patched import LOCAL_HINT

    # Skip what git and `snapshot_download(local_dir=...)` keep beside the files (.git, .cache/huggingface), and
    # the hint of where a patched model's local base lives on this machine.
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=files[name])
        for name in filter_repo_objects(files, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, LOCAL_HINT])
    ]
    if not operations:
        raise LorsaSurgeryError(f"Cannot push '{folder}': it holds no files.")
    api = HfApi(token=token, endpoint=endpoint)
    try:
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
    except HUB_FAILURES as err:
        raise hub_error(f"Could not push '{folder}' to Hub repo '{repo_id}'", err) from err


def pull(
    source: str | os.PathLike,
    revision: str | None = None,
    out_dir: str | os.PathLike | None = None,
    allow_patterns: str | list[str] | None = None,
) -> Path:
    """Return a local folder holding `source`: a local folder (as it is), `org/repo`, or `org/repo:subfolder`.

    Hub repos are fetched with `snapshot_download` at `revision` (branch, tag or commit; default main)
    into the Hugging Face cache, or copied into `out_dir` when given. For `org/repo:subfolder` only that
    subfolder is fetched and the returned path points into it; `allow_patterns` (relative to the
    subfolder) narrows the files further. With `HF_HUB_OFFLINE=1` the cache answers and no request is made.
    """
    if Path(source).is_dir():
        return Path(source)
    if str(source).startswith((".", "/", "~")):  # a path, never a repo id
        raise LorsaSurgeryError(f"Missing folder: {source}.")
    repo_id, _, subfolder = str(source).partition(":")
    subfolder = subfolder.strip("/")
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns or ["*"]]
    where = f"Hub repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        root = snapshot_download(repo_id, revision=revision, local_dir=out_dir, allow_patterns=patterns)
    except HUB_FAILURES as err:
        raise hub_error(f"Could not download {where}", err) from err
    folder = Path(root, subfolder)
    if not folder.is_dir():
        raise LorsaSurgeryError(f"{where} has no folder '{subfolder}'.")
    return folder


def hub_error(what: str, err: Exception) -> LorsaSurgeryError:
    """`what` plus the reason behind `err`, on one line."""
    if isinstance(err, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE=1 forbids network access"
    elif isinstance(err, RepositoryNotFoundError):
        why = "the repo does not exist, or your token cannot see it"
    elif isinstance(err, RevisionNotFoundError):
        why = "that revision does not exist"
    elif isinstance(err, LocalEntryNotFoundError):
        why = "the files are not in the local cache and the Hub cannot be reached"
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {err.response.status_code} ({err.server_message or err.response.reason_phrase})"
    else:  # a transport failure arrives wrapped (e.g. "Error while uploading ..."): its root says what broke
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        why = f"{str(err).rstrip('.')} ({type(root).__name__}: {root})" if root is not err else f"{type(err).__name__}: {err}"
    return LorsaSurgeryError(" ".join(f"{what}: {why}".split()).rstrip(".") + ".")
