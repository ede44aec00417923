"""Atomic file writes: a reader never sees a half-written file, and an interrupted write loses nothing saved."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _replace_from_temp(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; saved checkpoints are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def read_json(path: str | Path) -> Any:
    from lorsa_surgery.errors import LorsaSurgeryError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorsaSurgeryError(f"Missing file: {path}.") from None
    except json.JSONDecodeError as e:
        raise LorsaSurgeryError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
