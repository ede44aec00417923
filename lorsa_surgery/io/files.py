"""Safe writes and confined reads.

Files are written atomically (a reader never sees half of one). Folders are written whole: into a hidden staging
folder beside the target, then swapped in, so after a kill at any instant the target is the old folder or the new
one. A folder is replaced only if this toolkit wrote it (it holds MARKER) and the caller asked to overwrite it.
Paths read from a folder stay inside it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorsa_surgery.errors import LorsaSurgeryError


def _replace_from_temp(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-file
        if not _alive(stale.name[len(path.name) + 2 :].partition(".")[0]):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; saved checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _alive(pid: str) -> bool:
    """Whether the process a temporary file's name records still runs (an unreadable name counts as alive)."""
    if not pid.isdecimal():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_text(path: str | Path, text: str) -> Path:
    return _replace_from_temp(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_figure(path: str | Path, fig) -> Path:
    """A matplotlib Figure as PNG."""
    return _replace_from_temp(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _replace_from_temp(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or one sentence saying why they cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise LorsaSurgeryError(f"Missing file: {path}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorsaSurgeryError(f"{path} is not a readable safetensors file ({e}).") from None


MAX_JSON_BYTES = 64 << 20
"""The largest JSON file read: configs, catalogs and intervention specs are far smaller; a bigger one is hostile."""


def read_json(path: str | Path, *, expect: type | None = None) -> Any:
    """The JSON value in `path`, refused in one sentence if missing, malformed, too large or too deep, or (with
    `expect`) not of that type. NaN and Infinity are refused: JSON has no such numbers."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise LorsaSurgeryError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB; it is not a file this toolkit wrote.")
        value = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (FileNotFoundError, NotADirectoryError):
        raise LorsaSurgeryError(f"Missing file: {path}.") from None
    except IsADirectoryError:
        raise LorsaSurgeryError(f"{path} is a folder, not a JSON file.") from None
    except json.JSONDecodeError as e:
        raise LorsaSurgeryError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except UnicodeDecodeError:
        raise LorsaSurgeryError(f"{path} is not UTF-8 text.") from None
    except RecursionError:
        raise LorsaSurgeryError(f"{path} is nested too deeply to be a file this toolkit wrote.") from None
    except ValueError as e:  # a constant refused by _refuse_constant
        raise LorsaSurgeryError(f"{path} holds {e}, which is not a JSON number.") from None
    if expect is not None and not isinstance(value, expect):
        raise LorsaSurgeryError(f"{path} should hold a JSON {_JSON_NAMES.get(expect, expect.__name__)}, not {_json_name(value)}.")
    return value


_JSON_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "true or false"}


def _json_name(value: Any) -> str:
    return "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)


def _refuse_constant(name: str):
    raise ValueError(name)


# ---- folders ---------------------------------------------------------------------------------------------------------

MARKER = ".lorsa-surgery"
"""The file in every folder this toolkit writes whole; only such a folder is ever replaced."""


def check_out(out: str | Path, *, overwrite: bool = False) -> Path:
    """`out` if writing a folder there loses nothing: it is absent, empty, or (with `overwrite`) one this toolkit
    wrote. Call it before slow work starts; `new_folder` checks again when it writes."""
    out = Path(out)
    resolved = out.resolve()
    if resolved in (Path.cwd(), *Path.cwd().parents):
        raise LorsaSurgeryError(f"The output folder cannot be the current folder or one above it ({out}).")
    _recover(resolved)
    if out.is_symlink():
        raise LorsaSurgeryError(f"{out} is a symbolic link; choose another output folder.")
    if not out.exists():
        return out
    if not out.is_dir():
        raise LorsaSurgeryError(f"{out} exists and is not a folder; choose another output folder.")
    if not any(out.iterdir()):
        return out
    if not (out / MARKER).is_file():
        raise LorsaSurgeryError(f"{out} holds files lorsa-surgery did not write; choose another output folder (nothing was changed).")
    if not overwrite:
        raise LorsaSurgeryError(f"{out} holds an earlier lorsa-surgery result; pass --overwrite (overwrite=True) to replace it.")
    return out


def claim(out: str | Path, *, kind: str) -> Path:
    """Make `out` a folder this toolkit fills over time (a training run, a scan): create it, or take over an empty
    one, marking it ours; a folder already marked ours is kept as it is, anything else is refused."""
    out = Path(out)
    if not is_ours(out):
        check_out(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MARKER, {"written_by": "lorsa-surgery", "kind": kind})
    return out


def is_ours(folder: str | Path) -> bool:
    """Whether `folder` is one this toolkit wrote whole."""
    return (Path(folder) / MARKER).is_file() and not Path(folder).is_symlink()


@contextmanager
def new_folder(out: str | Path, *, overwrite: bool = False, kind: str = "folder") -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error it becomes `out`, replacing the old one in
    one step. Another process writing the same `out` at the same time is refused."""
    out = Path(out)
    check_out(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        check_out(out, overwrite=overwrite)  # the folder may have changed while this process worked
        for stale in out.parent.glob(f".{out.name}.lorsa-new-*"):  # left by a killed writer; the lock says none runs
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorsa-new-", dir=out.parent))
        try:
            os.chmod(staging, 0o755)  # mkdtemp makes folders private; what we write is meant to be shared
            yield staging
            write_json(staging / MARKER, {"written_by": "lorsa-surgery", "kind": kind})
            _swap(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive lock on a hidden file beside `out`, removed when released."""
    path = out.with_name(f".{out.name}.lorsa-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LorsaSurgeryError(f"Another lorsa-surgery process is writing {out}; try again when it has finished.") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there now
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _swap(staging: Path, out: Path) -> None:
    """Make `staging` the folder at `out` in one step; what `out` held is removed afterwards."""
    if not out.exists():
        os.rename(staging, out)
        return
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        at_cwd = -100
        if renameat2(at_cwd, os.fsencode(staging), at_cwd, os.fsencode(out), _RENAME_EXCHANGE) == 0:
            shutil.rmtree(staging)  # it now holds the old folder
            return
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(out))
    # No atomic exchange here (not Linux, or a file system without it): two renames, and `_recover` puts the old
    # folder back if a kill falls between them.
    old = out.with_name(f".{out.name}.lorsa-old")
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old)


def _recover(out: Path) -> None:
    old = out.with_name(f".{out.name}.lorsa-old")
    if old.is_dir() and not old.is_symlink():
        if not out.exists():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


# ---- confined reads --------------------------------------------------------------------------------------------------

def inside(folder: str | Path, name: Any, *, what: str) -> Path:
    """`folder / name` for a relative name read from a file in `folder`, refused if it is not a plain relative path
    or leads out of `folder` (through `..` or a symbolic link). `what` names the field for the error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LorsaSurgeryError(f"{what} should be a folder or file name inside {folder}, not {name!r}.")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise LorsaSurgeryError(f"{what} ({name!r}) leads outside {folder}; refused.")
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents:
        raise LorsaSurgeryError(f"{what} ({name!r}) leads outside {folder} through a symbolic link; refused.")
    return Path(folder) / name
