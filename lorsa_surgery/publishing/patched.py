"""Patched-model folders: the base model's name plus the spliced Lorsa modules, adapter-style.

Layout (README, "Patched models and the Hub"):
    lorsa_surgery.json     root config: format version, base model (id + revision, or file + sha256),
                           splice mode, and per layer its folder, format and site names
    layer_<L>/             one native Lorsa checkpoint per spliced layer (safetensors only)
    interventions.json     the attached intervention spec, if any
    adapter/               the LoRA adapter on the model, if any (PEFT's files, in the spliced model's naming)
    README.md              model card (see lorsa_surgery.publishing.cards)
    base/                  full-model export only (`export_full`): the base model's weights and tokenizer
    .lorsa_surgery.local.json  where a local base file or folder lives on the machine that made the folder
                           (a hint for loading it there without `base=`; `push` never uploads it)
The root file is deliberately not called config.json or adapter_config.json, which the Hub and
transformers take for other libraries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch

from lorsa_surgery.io import files

from lorsa_surgery.lorsa import formats

from lorsa_surgery.host import models, placement
from lorsa_surgery.host import state as host_state
from lorsa_surgery.io.hub import LOCAL_HINT
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.host.splicing import Mode, Splice, splice
from lorsa_surgery.host.arch import exact_copy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROOT_FILE = "lorsa_surgery.json"
FORMAT = "lorsa-surgery.patched-model"
FORMAT_VERSION = 1
INTERVENTIONS_FILE = "interventions.json"
BUNDLED_BASE = "base"


DEFAULT_MODULES = Path(__file__).parent.parent / "default_modules"
# Every attention layer of the embedded default model replaced and healed: a patched model shipped by name, whose
# modules are also what `all=default` splices.
COMPLETE = f"{models.DEFAULT_MODEL}-complete"


def shipped(name: str | Path) -> Path | None:
    """The folder of the patched model shipped under `name` ("smollm2-complete"), or None for any other name."""
    folder = DEFAULT_MODULES / str(name)
    return folder if str(name) == COMPLETE and is_patched_folder(folder) else None


def module_for(model, layer: int, spec: str, *, allow_pickle: bool = False, revision: str | None = None) -> Lorsa:
    """The Lorsa module a `LAYER=SPEC` option names: "from-attention" (an exact copy of the host layer),
    "default" (the module shipped for the embedded default model), or a checkpoint folder / Hub id."""
    if spec == "from-attention":
        return exact_copy(model, layer)
    if spec == "default":
        path = DEFAULT_MODULES / f"{models.DEFAULT_MODEL}-L{layer}"
        if not path.is_dir():
            shipped = sorted(p.name for p in DEFAULT_MODULES.glob("*")) if DEFAULT_MODULES.is_dir() else []
            raise LorsaSurgeryError(f"No default Lorsa module ships for layer {layer} (shipped: {', '.join(shipped) or 'none'}).")
        return Lorsa.from_pretrained(path)
    return Lorsa.from_pretrained(spec, allow_pickle=allow_pickle, revision=revision)


def every_layer(spec: str, n_layers: int) -> dict[int, str]:
    """The per-layer specs of `all=SPEC`: "from-attention" (an exact copy of every layer), "default" (the modules of
    the shipped complete replacement of the default model), or a local folder holding a module for each of the
    `n_layers` layers, as a training run (`L0/`, `L1/`, ...) or a patched model keeps them."""
    if spec == "from-attention":
        return {layer: spec for layer in range(n_layers)}
    folder = Path(spec) if spec != "default" else shipped(COMPLETE)
    if folder is None:
        raise LorsaSurgeryError(f"all=default: the complete replacement {COMPLETE} is not installed with this copy of lorsa-surgery.")
    if is_patched_folder(folder):
        folders = module_folders(folder)
    elif folder.is_dir():
        folders = {layer: folder / f"L{layer}" for layer in range(n_layers) if (folder / f"L{layer}").is_dir()}
    else:
        raise LorsaSurgeryError(f"all={spec}: give from-attention or a local folder with a module per layer (L0/, L1/, ...).")
    missing = [layer for layer in range(n_layers) if layer not in folders]
    if missing:
        raise LorsaSurgeryError(f"all={spec}: {folder} has no module for layer{'s' * (len(missing) > 1)} "
                                f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''} of {n_layers}.")
    return {layer: str(folders[layer]) for layer in range(n_layers)}


def is_patched_folder(path: str | Path) -> bool:
    return (Path(path) / ROOT_FILE).is_file()


def save_patched(
    handle: Splice, out_dir: str | Path, *, base: dict[str, Any] | None = None, metrics: dict | None = None,
    repo_id: str | None = None, overwrite: bool = False,
) -> Path:
    """Write the patched-model folder for a splice, whole: out_dir changes only once everything is written.

    `base` is the base model's record (`models.base_record`), by default the one the splice knows (models loaded
    with `load_model` or `load_patched`); `repo_id`, when known, goes into the card's usage examples. An existing
    out_dir is replaced only if this toolkit wrote it and `overwrite` is set (`files.new_folder`).
    """
    return _write(handle, Path(out_dir), base, metrics, repo_id, tokenizer=None, overwrite=overwrite)


def export_full(
    handle: Splice,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    base: dict[str, Any] | None = None,
    metrics: dict | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """`save_patched` plus the base model's own weights and tokenizer in `base/`, so the folder (or the repo
    it is pushed to) is self-contained: `load_patched` then loads that copy instead of fetching the base."""
    return _write(handle, Path(out_dir), base, metrics, repo_id, tokenizer=tokenizer, overwrite=overwrite)


def _write(
    handle: Splice, out_dir: Path, base: dict[str, Any], metrics: dict | None, repo_id: str | None,
    tokenizer: PreTrainedTokenizerBase | None, overwrite: bool,
) -> Path:
    base = base if base is not None else handle.base
    if base is None:
        raise LorsaSurgeryError("The base model of this splice is unknown; pass base=lorsa_surgery.host.models.base_record(...).")
    with files.new_folder(out_dir, overwrite=overwrite, kind=FORMAT) as staging:
        layers = {}
        for layer, lorsa in handle.modules().items():
            folder = f"layer_{layer}"
            formats.save_native(lorsa, staging / folder)
            layers[str(layer)] = {"folder": folder, "format": "native", **handle.arch.site_names(layer)}
        interventions = handle.interventions
        if interventions is not None:
            files.write_json(staging / INTERVENTIONS_FILE, interventions.to_dict())
        if handle.adapter is not None:
            from lorsa_surgery.training.healing import ADAPTER_FOLDER, save_adapter

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
        from lorsa_surgery.publishing import cards

        files.write_text(staging / "README.md", cards.render(root, handle.modules(), interventions, repo_id))
    return out_dir


def _adapter_record(handle: Splice) -> dict[str, Any] | None:
    if handle.adapter is None:
        return None
    from lorsa_surgery.training.healing import ADAPTER_FOLDER

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


def read_root(folder: str | Path) -> dict[str, Any]:
    """The root config of a patched-model folder, checked: right types, and every file or folder it names inside
    `folder` (a pulled repo must not point the loader elsewhere on the machine)."""
    path = Path(folder) / ROOT_FILE
    root = files.read_json(path, expect=dict)
    if root.get("format") != FORMAT:
        raise LorsaSurgeryError(f"{path} is not a lorsa-surgery patched-model config.")
    version = root.get("format_version", 0)
    if type(version) is not int:
        raise LorsaSurgeryError(f"{path}: format_version should be an integer, not {version!r}.")
    if version > FORMAT_VERSION:
        raise LorsaSurgeryError(f"{folder} was written by a newer lorsa-surgery; please upgrade.")

    def field(name: str, kind: type, optional: bool = False):
        value = root.get(name)
        if not isinstance(value, kind) and not (optional and value is None):
            raise LorsaSurgeryError(f"{path}: {name} should be {'null or ' if optional else ''}a JSON "
                                    f"{'object' if kind is dict else 'string'}, not {value!r:.60}.")
        return value

    record = field("base_model", dict)
    if not isinstance(record.get("id"), str) or not all(isinstance(record.get(k), (str, type(None)))
                                                           for k in ("revision", "sha256", "fingerprint", "file")):
        raise LorsaSurgeryError(f"{path}: base_model should name the base by id (and revision, file, sha256 or fingerprint) as strings.")
    if root.get("mode") not in get_args(Mode):
        raise LorsaSurgeryError(f"{path}: mode should be one of {', '.join(get_args(Mode))}, not {root.get('mode')!r:.60}.")
    layers = field("layers", dict)
    if not layers:
        raise LorsaSurgeryError(f"{path} names no layers.")
    for key, entry in layers.items():
        if not key.isdecimal() or str(int(key)) != key:
            raise LorsaSurgeryError(f"{path}: layer {key!r:.60} should be a layer number written plainly (3, not 03 or -1).")
        if not isinstance(entry, dict):
            raise LorsaSurgeryError(f"{path}: layer {key} should be a JSON object.")
        files.inside(folder, entry.get("folder"), what=f"{path}: layer {key}'s folder")
    for name in ("interventions", "bundled_base"):
        if field(name, str, optional=True) is not None:
            files.inside(folder, root[name], what=f"{path}: {name}")
    if field("adapter", dict, optional=True) is not None:
        files.inside(folder, root["adapter"].get("folder"), what=f"{path}: adapter folder")
    field("metrics", dict, optional=True)
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
    path = _hinted_base(folder, record)
    if path is not None:
        return path, None
    kind = "file" if "sha256" in record else "folder"
    digest = record.get("sha256") or record["fingerprint"]
    raise LorsaSurgeryError(
        f"The base model was the local {kind} {record.get('file') or record['id']} ({digest[:12]}...), not found here; "
        "pass base=PATH (CLI: --base)."
    )


def _hinted_base(folder: Path, record: dict[str, Any]) -> str | None:
    """The local base the hint names, if the hint is as this toolkit writes it (an absolute path to a file, or to a
    model folder holding config.json) and that path still holds the recorded base. Anything else is ignored: a
    hint is data from the folder, not an instruction to read the machine."""
    hint = folder / LOCAL_HINT
    if not hint.is_file() or hint.is_symlink():
        return None
    try:
        path = files.read_json(hint, expect=dict).get("base_path")
    except LorsaSurgeryError:
        return None
    if not isinstance(path, str) or not Path(path).is_absolute():
        return None
    wanted = Path(path).is_file() if "sha256" in record else (Path(path) / "config.json").is_file()
    return path if wanted and models.matches(record, path) else None


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
        from lorsa_surgery.io.hub import pull

        folder = shipped(path_or_repo) or Path(pull(str(path_or_repo), revision=revision))
    root = read_root(folder)
    if base is None and root.get("bundled_base"):
        base = str(_part(folder, root["bundled_base"], "bundled base"))
    spec, base_revision = _base_spec(root, folder, base)
    modules = {layer: Lorsa.from_pretrained(path) for layer, path in module_folders(folder, root).items()}
    model, tokenizer = models.load_model(spec, revision=base_revision, dtype=dtype, device_map=device_map,
                                         max_memory=max_memory, offload_dir=offload_dir, lorsa=modules, lorsa_dtype=lorsa_dtype)
    handle = splice(model, modules, mode=mode or root["mode"], dtype=placement.dtype_of(lorsa_dtype))
    # The base stays the one recorded (the Hub id behind a bundled copy, say), so saving this again loads back.
    local = host_state.get(model, "base").get(models.LOCAL_PATH)
    handle.base = {**root["base_model"], **({models.LOCAL_PATH: local} if local else {})}
    if root.get("adapter"):
        from lorsa_surgery.training.healing import load_adapter

        load_adapter(handle, _part(folder, root["adapter"]["folder"], "adapter"))
    if root.get("interventions"):
        from lorsa_surgery.interventions.edits import InterventionSet

        InterventionSet.load(_part(folder, root["interventions"], "interventions")).attach(handle)
    return model, tokenizer, handle


def module_folders(folder: str | Path, root: dict[str, Any] | None = None) -> dict[int, Path]:
    """The Lorsa module folder of each spliced layer of a patched-model folder."""
    root = root if root is not None else read_root(folder)
    return {int(layer): _part(Path(folder), entry["folder"], f"layer {layer}") for layer, entry in root["layers"].items()}


def _part(folder: Path, name: str, what: str) -> Path:
    """A file or folder the (checked) root config names, which must be there."""
    path = files.inside(folder, name, what=f"{folder}: {what}")
    if not path.exists():
        raise LorsaSurgeryError(f"{folder} names {name} for its {what}, but has no such file or folder.")
    return path
