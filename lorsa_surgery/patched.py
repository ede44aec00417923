"""Patched-model folders: the base model's name plus the spliced Lorsa modules, adapter-style.

Layout (README, "Patched models and the Hub"):
    lorsa_surgery.json     root config: format version, base model (id + revision, or file + sha256),
                           splice mode, and per layer its folder, format and site names
    layer_<L>/             one native Lorsa checkpoint per spliced layer (safetensors only)
    interventions.json     the attached intervention spec, if any
    adapter/               the LoRA adapter on the model, if any (PEFT's files, in the spliced model's naming)
    README.md              model card (see lorsa_surgery.cards)
    base/                  full-model export only (`export_full`): the base model's weights and tokenizer
    .lorsa_surgery.local.json  where a local base file or folder lives on the machine that made the folder
                           (a hint for loading it there without `base=`; `push` never uploads it)
The root file is deliberately not called config.json or adapter_config.json, which the Hub and
transformers take for other libraries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorsa_surgery import files, models, placement
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa import Lorsa
from lorsa_surgery.splicing import Mode, Splice, splice

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROOT_FILE = "lorsa_surgery.json"
FORMAT = "lorsa-surgery.patched-model"
FORMAT_VERSION = 1
INTERVENTIONS_FILE = "interventions.json"
BUNDLED_BASE = "base"
LOCAL_HINT = ".lorsa_surgery.local.json"


DEFAULT_MODULES = Path(__file__).parent / "default_modules"


def module_for(model, layer: int, spec: str, *, allow_pickle: bool = False, revision: str | None = None) -> Lorsa:
    """The Lorsa module a `LAYER=SPEC` option names: "from-attention" (an exact copy of the host layer),
    "default" (the module shipped for the embedded default model), or a checkpoint folder / Hub id."""
    if spec == "from-attention":
        return Lorsa.from_attention(model, layer)
    if spec == "default":
        path = DEFAULT_MODULES / f"{models.DEFAULT_MODEL}-L{layer}"
        if not path.is_dir():
            shipped = sorted(p.name for p in DEFAULT_MODULES.glob("*")) if DEFAULT_MODULES.is_dir() else []
            raise LorsaSurgeryError(f"No default Lorsa module ships for layer {layer} (shipped: {', '.join(shipped) or 'none'}).")
        return Lorsa.from_pretrained(path)
    return Lorsa.from_pretrained(spec, allow_pickle=allow_pickle, revision=revision)


def is_patched_folder(path: str | Path) -> bool:
    return (Path(path) / ROOT_FILE).is_file()


def save_patched(
    handle: Splice, out_dir: str | Path, *, base: dict[str, Any] | None = None, metrics: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the patched-model folder for a splice; replaces out_dir only once everything is written.

    `base` is the base model's record (`models.base_record`), by default the one the splice knows (models loaded
    with `load_model` or `load_patched`); `repo_id`, when known, goes into the card's usage examples.
    """
    return _write(handle, Path(out_dir), base, metrics, repo_id, tokenizer=None)


def export_full(
    handle: Splice,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    base: dict[str, Any] | None = None,
    metrics: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """`save_patched` plus the base model's own weights and tokenizer in `base/`, so the folder (or the repo
    it is pushed to) is self-contained: `load_patched` then loads that copy instead of fetching the base."""
    return _write(handle, Path(out_dir), base, metrics, repo_id, tokenizer=tokenizer)


def _write(
    handle: Splice, out_dir: Path, base: dict[str, Any], metrics: dict | None, repo_id: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> Path:
    base = base if base is not None else handle.base
    if base is None:
        raise LorsaSurgeryError("The base model of this splice is unknown; pass base=lorsa_surgery.models.base_record(...).")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes folders private; a patched model is meant to be shared
    try:
        layers = {}
        for layer, lorsa in handle.modules().items():
            folder = f"layer_{layer}"
            lorsa.save_pretrained(staging / folder)
            layers[str(layer)] = {"folder": folder, "format": "native", **handle.arch.site_names(layer)}
        interventions = handle.interventions
        if interventions is not None:
            files.write_json(staging / INTERVENTIONS_FILE, interventions.to_dict())
        if handle.adapter is not None:
            from lorsa_surgery.healing import ADAPTER_FOLDER, save_adapter

            save_adapter(handle, staging / ADAPTER_FOLDER)
        if tokenizer is not None:
            handle.model.save_pretrained(staging / BUNDLED_BASE, state_dict=_base_state_dict(handle))
            tokenizer.save_pretrained(staging / BUNDLED_BASE)
        root = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": models.public_record(base),
            "architecture": handle.arch.name,
            "mode": handle.mode,
            "layers": layers,
            "interventions": INTERVENTIONS_FILE if interventions is not None else None,
            "adapter": _adapter_record(handle),
            "metrics": metrics,
            "bundled_base": BUNDLED_BASE if tokenizer is not None else None,
        }
        files.write_json(staging / ROOT_FILE, root)
        if base.get(models.LOCAL_PATH):
            files.write_json(staging / LOCAL_HINT, {"base_path": base[models.LOCAL_PATH]})
        from lorsa_surgery import cards

        files.write_text(staging / "README.md", cards.render(root, handle.modules(), interventions, repo_id))
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _adapter_record(handle: Splice) -> dict[str, Any] | None:
    if handle.adapter is None:
        return None
    from lorsa_surgery.healing import ADAPTER_FOLDER

    return {"folder": ADAPTER_FOLDER, "type": "lora", "rank": handle.adapter.r, "alpha": handle.adapter.lora_alpha,
            "targets": len(handle.adapter.target_modules)}


def _base_state_dict(handle: Splice) -> dict[str, torch.Tensor]:
    """The host model's weights as if nothing were spliced, without touching the splice: each site's
    original attention (and the post-attention norm it absorbed) under the names the host gives them."""
    names = {id(module): name for name, module in handle.model.named_modules()}
    renames: dict[str, str | None] = {}  # key prefix -> its prefix in the base model, or None to drop it
    for site in handle.sites.values():
        at = names[id(site)]
        renames.update({f"{at}.original.": f"{at}.", f"{at}.lorsa.": None, f"{at}.source.": None})
        if site.post_norm is not None:
            renames[f"{at}.post_norm."] = f"{at.rpartition('.')[0]}.{handle.arch.post_attention_norm}."
    state = {}
    for key, value in handle.model.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        elif renames[prefix] is not None:
            state[renames[prefix] + key[len(prefix) :]] = value
    return state


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Put a fully written folder where out_dir is, keeping the old one until the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_root(folder: str | Path) -> dict[str, Any]:
    root = files.read_json(Path(folder) / ROOT_FILE)
    if root.get("format") != FORMAT:
        raise LorsaSurgeryError(f"{folder}/{ROOT_FILE} is not a lorsa-surgery patched-model config.")
    if root.get("format_version", 0) > FORMAT_VERSION:
        raise LorsaSurgeryError(f"{folder} was written by a newer lorsa-surgery; please upgrade.")
    return root


def _base_spec(root: dict[str, Any], folder: Path, base: str | None) -> tuple[str, str | None]:
    """The model spec and revision to load the base from: `base` if given, the Hub id, the installed default, or
    the local file or folder the hint names when it still holds the recorded base."""
    if base is not None:
        return base, None
    record = root["base_model"]
    if record["id"] == models.DEFAULT_MODEL and "sha256" in record:
        path = models.resolve(models.DEFAULT_MODEL)["path"]
        if models.sha256_of(path) != record["sha256"]:
            raise LorsaSurgeryError("The installed default model differs from the one this patched model was made on.")
        return models.DEFAULT_MODEL, None
    if "sha256" not in record and "fingerprint" not in record:
        return record["id"], record.get("revision")
    hint = folder / LOCAL_HINT
    if hint.is_file():
        path = files.read_json(hint).get("base_path")
        if path and models.matches(record, path):
            return path, None
    kind = "file" if "sha256" in record else "folder"
    digest = record.get("sha256") or record["fingerprint"]
    raise LorsaSurgeryError(
        f"The base model was the local {kind} {record.get('file') or record['id']} ({digest[:12]}...), not found here; "
        "pass base=PATH (CLI: --base)."
    )


def load_patched(
    path_or_repo: str | Path,
    *,
    revision: str | None = None,
    base: str | None = None,
    mode: Mode | None = None,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    max_memory: dict | str | None = None,
    offload_dir: str | Path | None = None,
    lorsa_dtype: torch.dtype | str | None = None,
):
    """(model, tokenizer, splice handle) rebuilt from a patched-model folder or Hub repo (+ revision).

    The base model is the copy bundled by `export_full` if there is one, else fetched by its recorded id and
    revision; `base` overrides either with a Hub id, a local folder or a .gguf file (a local file is checked
    against the recorded sha256 when it is the default). Placement and dtypes as in `models.load_model` and
    `splice`; an automatic device map counts the Lorsa modules, which are read before the base.
    """
    folder = Path(path_or_repo)
    if not folder.exists():
        from lorsa_surgery.hub import pull

        folder = Path(pull(str(path_or_repo), revision=revision))
    root = read_root(folder)
    if base is None and root.get("bundled_base"):
        base = str(folder / root["bundled_base"])
    spec, base_revision = _base_spec(root, folder, base)
    modules = {int(layer): Lorsa.from_pretrained(folder / entry["folder"]) for layer, entry in root["layers"].items()}
    model, tokenizer = models.load_model(spec, revision=base_revision, dtype=dtype, device_map=device_map,
                                         max_memory=max_memory, offload_dir=offload_dir, lorsa=modules, lorsa_dtype=lorsa_dtype)
    handle = splice(model, modules, mode=mode or root["mode"], dtype=placement.dtype_of(lorsa_dtype))
    # The base stays the one recorded (the Hub id behind a bundled copy, say), so saving this again loads back.
    local = model._lorsa_base.get(models.LOCAL_PATH)
    handle.base = {**root["base_model"], **({models.LOCAL_PATH: local} if local else {})}
    if root.get("adapter"):
        from lorsa_surgery.healing import load_adapter

        load_adapter(handle, folder / root["adapter"]["folder"])
    if root.get("interventions"):
        from lorsa_surgery.interventions import InterventionSet

        InterventionSet.from_dict(files.read_json(folder / root["interventions"])).attach(handle)
    return model, tokenizer, handle
