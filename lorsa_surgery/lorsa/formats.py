"""Reading and writing Lorsa checkpoints: our native format, the reference (llamascopium / lm-saes) format,
and the paper-era format. Every reader is strict: a missing or unexpected tensor, or a shape that contradicts
the config, is an error, never a silent partial load.

The modules read and written here are `lorsa.model.Lorsa`s, annotated by their base class nn.Module: lorsa.model
imports this module, not the other way round."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.lorsa.config import MAX_INDEX, OWN_ROPE_TYPES, LorsaConfig, check_number, rotary_inverse_wavelengths

Empty = Callable[[LorsaConfig], nn.Module]
"""Builds a module of a config with no weights behind it (`Lorsa._without_weights`): the loaders fill it."""

NATIVE_FORMAT = "lorsa-surgery.lorsa"
NATIVE_VERSION = 1
NATIVE_CONFIG, NATIVE_WEIGHTS, NATIVE_CATALOG = "lorsa_config.json", "lorsa.safetensors", "head_catalog.json"
NATIVE_TRAINING = "training.json"

# Buffers the reference writes that we recompute (rotary tables, causal mask) and never need.
_REFERENCE_IGNORED = {"mask", "IGNORE", "rotary_sin", "rotary_cos"}


def detect(folder: Path) -> str:
    """'native', 'reference' or 'paper' for a checkpoint folder."""
    if (folder / NATIVE_CONFIG).exists():
        return "native"
    if not (folder / "config.json").exists():
        raise LorsaSurgeryError(
            f"No Lorsa checkpoint in {folder}: expected {NATIVE_CONFIG}, or config.json with sae_weights.safetensors or final.pth."
        )
    raw = files.read_json(folder / "config.json", expect=dict)
    if "sae_type" in raw:
        if raw["sae_type"] != "lorsa":
            raise LorsaSurgeryError(f"{folder} holds a sparse dictionary of sae_type {raw['sae_type']!r:.60}, not a Lorsa module.")
        return "reference"
    if (folder / "final.pth").exists():
        return "paper"
    raise LorsaSurgeryError(f"{folder}/config.json is neither a reference Lorsa config (no sae_type) nor paired with final.pth.")


def resolve(path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub `repo_id` or `repo_id:subfolder`, downloaded to the cache."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise LorsaSurgeryError(f"{local} is a file; a Lorsa checkpoint is a folder.")
        return local
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1 and ":" not in str(path):
        raise LorsaSurgeryError(f"Missing file or folder: {path}.")
    from lorsa_surgery.io.hub import pull

    return Path(pull(str(path), revision=revision))


def load(
    path: str | Path, empty: Empty, *, allow_pickle: bool = False, revision: str | None = None,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> nn.Module:
    folder = resolve(path, revision)
    kind = detect(folder)
    if kind == "native":
        lorsa = _load_native(folder, empty)
    elif kind == "reference":
        lorsa = _load_reference(folder, empty)
    else:
        lorsa = _load_paper(folder, empty, allow_pickle)
    lorsa.origin.update(format=kind, path=str(path), revision=revision)
    # Weights are read (and norms folded) in float32; the module then goes where it will run, in one move.
    return lorsa.to(device=device or "cpu", dtype=dtype)


def describe(lorsa: nn.Module) -> dict[str, Any]:
    """What `lorsa-surgery inspect` shows: format, dims, sparsity, rotary, norms, input space, host."""
    c = lorsa.cfg
    rotary = None
    if c.positional_embedding_type == "rotary":
        rotary = {
            "dim": c.rotary_dim,
            "base": c.rotary_base,
            "pairs": "adjacent (GPT-J)" if c.rotary_adjacent_pairs else "halves (NeoX/Llama)",
            "type": c.rope_type if c.rope_type in OWN_ROPE_TYPES else f"{c.rope_type} (cos and sin from the host)",
            "ntk_by_parts": {
                "factor": c.NTK_by_parts_factor,
                "low_freq_factor": c.NTK_by_parts_low_freq_factor,
                "high_freq_factor": c.NTK_by_parts_high_freq_factor,
                "old_context_len": c.old_context_len,
            }
            if c.use_NTK_by_parts_rope
            else None,
        }
    return {
        "format": lorsa.origin.get("format"),
        "path": lorsa.origin.get("path"),
        "d_model": c.d_model,
        "n_ov_heads": c.n_ov_heads,
        "n_qk_heads": c.n_qk_heads,
        "d_qk_head": c.d_qk_head,
        "group_size": c.group_size,
        "act_fn": c.act_fn,
        "top_k": c.top_k if c.act_fn == "topk" else None,
        "attn_scale": c.attn_scale,
        "qk_norm": c.use_post_qk_ln,
        "decoder_bias": c.use_decoder_bias,
        "rotary": rotary,
        "folded_norms": lorsa.origin.get("folded_norms"),
        "input_space": c.input_space,
        "host": {"model": c.host_model, "revision": c.host_revision, "layer": c.host_layer},
        "hook_points": {"in": c.hook_point_in, "out": c.hook_point_out},
        "n_parameters": sum(p.numel() for p in lorsa.parameters()),
        "labels": {f"H{h}": info.get("label", "") for h, info in sorted(lorsa.catalog.items())},
    }


# ---- native -------------------------------------------------------------------------------------


def save_catalog(lorsa: nn.Module, path: str | Path) -> None:
    """Write only the head catalog of a native folder: relabelling leaves the weights (and their dtype) alone."""
    files.write_json(Path(path) / NATIVE_CATALOG, {"heads": {str(k): v for k, v in sorted(lorsa.catalog.items())}})


def save_native(lorsa: nn.Module, path: str | Path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in lorsa.state_dict().items()}
    files.write_safetensors(folder / NATIVE_WEIGHTS, tensors, {"format": NATIVE_FORMAT, "format_version": str(NATIVE_VERSION)})
    save_catalog(lorsa, folder)
    if lorsa.training_info:
        files.write_json(folder / NATIVE_TRAINING, lorsa.training_info)
    # The config goes last: its presence marks a complete checkpoint.
    files.write_json(
        folder / NATIVE_CONFIG, {"format": NATIVE_FORMAT, "format_version": NATIVE_VERSION, "config": lorsa.cfg.to_dict()}
    )
    return folder


def _load_native(folder: Path, empty: Empty) -> nn.Module:
    path = folder / NATIVE_CONFIG
    raw = files.read_json(path, expect=dict)
    if raw.get("format") != NATIVE_FORMAT or "config" not in raw:
        raise LorsaSurgeryError(f"{path} is not a lorsa-surgery module config.")
    version = check_number(raw.get("format_version", 0), f"{path}: format_version", integer=True, minimum=0)
    if version > NATIVE_VERSION:
        raise LorsaSurgeryError(f"{folder} was written by a newer lorsa-surgery (format {version}); please upgrade.")
    with _about(path):
        lorsa = empty(LorsaConfig.from_dict(raw["config"]))
    _assign(lorsa, files.read_safetensors(folder / NATIVE_WEIGHTS), folder / NATIVE_WEIGHTS)
    if (folder / NATIVE_CATALOG).exists():
        lorsa.catalog = read_catalog(folder / NATIVE_CATALOG, lorsa.cfg.n_ov_heads)
    if (folder / NATIVE_TRAINING).exists():
        lorsa.training_info = files.read_json(folder / NATIVE_TRAINING, expect=dict)
    return lorsa


_HEAD_KEY = re.compile(r"0|[1-9][0-9]*")


def read_catalog(path: Path, n_heads: int) -> dict[int, dict[str, str]]:
    """The head catalog in `path`, refused in one sentence unless every key is a head index written plainly ("5",
    never "05" or "-1", which would collide or index from the end) below `n_heads`, and every entry an object of
    string label and note."""
    heads = files.read_json(path, expect=dict).get("heads", {})
    if not isinstance(heads, dict):
        raise LorsaSurgeryError(f"{path}: heads must be an object of head index -> entry.")
    catalog = {}
    for key, entry in heads.items():
        if not _HEAD_KEY.fullmatch(key) or int(key) >= n_heads:
            raise LorsaSurgeryError(f"{path}: {key[:40]!r} is not a head index of this module (0 to {n_heads - 1}, written plainly).")
        if not isinstance(entry, dict) or set(entry) - {"label", "note"} or not all(isinstance(v, str) for v in entry.values()):
            raise LorsaSurgeryError(f"{path}: the entry of head {key} must be an object with a string label and note, got {entry!r:.60}.")
        catalog[int(key)] = dict(entry)
    return catalog


# ---- reference (llamascopium / lm-saes) ---------------------------------------------------------


def _reference_config(raw: dict[str, Any]) -> tuple[LorsaConfig, str]:
    """The config of a reference config.json, and its norm_activation; fields the reference names differently from
    LorsaConfig are checked under the reference's names."""
    if raw.get("rotary_scale", 1) != 1:
        raise LorsaSurgeryError(f"rotary_scale={raw['rotary_scale']!r:.60} is not supported (only 1).")
    act_fn = raw.get("act_fn", "relu")
    if act_fn not in ("topk", "jumprelu", "relu"):
        raise LorsaSurgeryError(f"act_fn {act_fn!r:.60} is not supported for inference (use topk, jumprelu or relu).")
    if raw.get("use_post_qk_ln") and raw.get("normalization_type") != "RMS":
        raise LorsaSurgeryError(f"QK norm of normalization_type {raw.get('normalization_type')!r:.60} is not supported (only RMS).")
    for key in ("d_model", "n_qk_heads", "d_qk_head"):
        if key not in raw:
            raise LorsaSurgeryError(f"Reference config lacks {key}.")
    d_model = check_number(raw["d_model"], "d_model", integer=True, minimum=1, maximum=MAX_INDEX)
    if raw.get("d_sae"):
        n_ov = check_number(raw["d_sae"], "d_sae", integer=True, minimum=1, maximum=MAX_INDEX)
    else:
        n_ov = round(d_model * check_number(raw.get("expansion_factor"), "expansion_factor", above=0, maximum=MAX_INDEX))
    for key in ("hook_point_in", "hook_point_out", "model_name", "norm_activation"):
        if not isinstance(raw.get(key), (str, type(None))):
            raise LorsaSurgeryError(f"{key} must be a string, got {raw[key]!r:.60}.")
    hook_in = raw.get("hook_point_in")
    layer = re.search(r"blocks\.(\d+)\.", hook_in or "")
    cfg = LorsaConfig(
        d_model=d_model,
        n_qk_heads=raw["n_qk_heads"],
        d_qk_head=raw["d_qk_head"],
        n_ov_heads=n_ov,
        act_fn=act_fn,
        top_k=raw.get("top_k") or 1,
        sparsity_include_decoder_norm=raw.get("sparsity_include_decoder_norm", True),
        use_decoder_bias=raw.get("use_decoder_bias", True),
        attn_scale=raw.get("attn_scale"),
        positional_embedding_type=raw.get("positional_embedding_type", "rotary"),
        rotary_dim=raw.get("rotary_dim"),
        rotary_base=raw.get("rotary_base", 10000),
        # The reference defaults to adjacent pairs; an absent key means that default.
        rotary_adjacent_pairs=raw.get("rotary_adjacent_pairs", True),
        use_NTK_by_parts_rope=raw.get("use_NTK_by_parts_rope", False),
        NTK_by_parts_factor=raw.get("NTK_by_parts_factor", 1.0),
        NTK_by_parts_low_freq_factor=raw.get("NTK_by_parts_low_freq_factor", 1.0),
        NTK_by_parts_high_freq_factor=raw.get("NTK_by_parts_high_freq_factor", 1.0),
        old_context_len=raw.get("old_context_len", 2048),
        use_post_qk_ln=raw.get("use_post_qk_ln", False),
        qk_ln_eps=check_number(raw.get("eps", 1e-6), "eps", minimum=0),
        n_ctx=raw.get("n_ctx", 2048),
        input_space="processed",
        host_model=raw.get("model_name"),
        host_layer=int(layer.group(1)) if layer else None,
        hook_point_in=hook_in,
        hook_point_out=raw.get("hook_point_out"),
    )
    return cfg, raw.get("norm_activation", "inference")


def _load_reference(folder: Path, empty: Empty) -> nn.Module:
    raw = files.read_json(folder / "config.json", expect=dict)
    with _about(folder / "config.json"):
        cfg, norm_activation = _reference_config(raw)
    weights = folder / "sae_weights.safetensors"
    state = files.read_safetensors(weights)
    with _about(weights):  # a zero, negative or NaN norm would scale every weight into NaN or the wrong sign
        norms = {k.split(".", 1)[1]: check_number(float(v) if v.numel() == 1 else v.tolist(), k, above=0)
                 for k, v in state.items() if k.startswith("dataset_average_activation_norm.")}
    tensors = {k: v for k, v in state.items() if k not in _REFERENCE_IGNORED and not k.startswith("dataset_average_activation_norm.")}
    renames = {"b_O": "b_D", "ln_q.w": "q_norm", "ln_k.w": "k_norm", "activation_function.log_jumprelu_threshold": "log_jumprelu_threshold"}
    tensors = {renames.get(k, k): v for k, v in tensors.items()}
    tensors.setdefault("b_V", torch.zeros(cfg.n_ov_heads))
    # Some checkpoints store fewer QK heads than the config names; the reference repeats them.
    stored = tensors.get("W_Q")
    n_stored = stored.shape[0] if isinstance(stored, torch.Tensor) and stored.dim() else cfg.n_qk_heads
    if n_stored != cfg.n_qk_heads and n_stored and cfg.n_qk_heads % n_stored == 0:
        for k in ("W_Q", "W_K", "b_Q", "b_K", "q_norm", "k_norm"):
            if k in tensors and tensors[k].dim():  # one without a head dimension is refused by _assign
                tensors[k] = tensors[k].repeat_interleave(cfg.n_qk_heads // n_stored, dim=0)
    lorsa = empty(cfg)
    _assign(lorsa, tensors, weights)
    if norm_activation == "dataset-wise":
        if cfg.hook_point_in in norms and cfg.hook_point_out in norms:
            fold_dataset_norms(lorsa, norms[cfg.hook_point_in], norms[cfg.hook_point_out])
        else:
            warnings.warn(
                f"{folder}: norm_activation is dataset-wise but no dataset norms are stored; "
                "assuming they were already folded into the weights.",
                stacklevel=3,
            )
    elif norm_activation != "inference":
        raise LorsaSurgeryError(f"norm_activation {norm_activation!r:.60} cannot be folded into weights (need dataset-wise or inference).")
    return lorsa


@torch.no_grad()
def fold_dataset_norms(lorsa: nn.Module, norm_in: float, norm_out: float) -> None:
    """Fold dataset-wise input/output scaling into the weights; head activations stay identical."""
    d = lorsa.cfg.d_model
    f_in, f_out = math.sqrt(d) / norm_in, math.sqrt(d) / norm_out
    lorsa.W_Q.mul_(f_in)
    lorsa.W_K.mul_(f_in)
    lorsa.W_V.mul_(f_in)
    lorsa.W_O.div_(f_out)
    lorsa.origin["folded_norms"] = {"in": norm_in, "out": norm_out}
    if lorsa.b_D is not None:
        lorsa.b_D.div_(f_out)
    if lorsa.cfg.act_fn == "jumprelu" and lorsa.cfg.sparsity_include_decoder_norm:
        # The threshold is compared with z * |W_O|, which just shrank by f_out.
        lorsa.log_jumprelu_threshold.sub_(math.log(f_out))


# ---- paper era (config.json + final.pth) --------------------------------------------------------


def _load_paper(folder: Path, empty: Empty, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise LorsaSurgeryError(
            f"{folder}/final.pth is a pickle; pass allow_pickle=True (CLI: --allow-pickle) only if you trust its source."
        )
    raw = files.read_json(folder / "config.json", expect=dict)
    with _about(folder / "config.json"):
        cfg, norm_in, norm_out = _paper_config(raw)
    try:
        state = torch.load(folder / "final.pth", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise LorsaSurgeryError(f"Could not read {folder}/final.pth as plain tensors: {e}") from None
    if not isinstance(state, dict):
        raise LorsaSurgeryError(f"{folder}/final.pth holds a {type(state).__name__}, not a dictionary of named tensors.")
    renames = {"b_O": "b_D"}
    tensors = {renames.get(k, k): v for k, v in state.items() if k not in {"mask", "IGNORE", "rotary_sin", "rotary_cos"}}
    for key, shape in (("W_V", (cfg.n_ov_heads, cfg.d_model)), ("W_O", (cfg.n_ov_heads, cfg.d_model)), ("b_V", (cfg.n_ov_heads,))):
        if isinstance(tensors.get(key), torch.Tensor) and tensors[key].numel() == math.prod(shape):
            tensors[key] = tensors[key].reshape(shape)
    lorsa = empty(cfg)
    _assign(lorsa, tensors, folder / "final.pth")
    fold_dataset_norms(lorsa, norm_in, norm_out)
    return lorsa


def _paper_config(raw: dict[str, Any]) -> tuple[LorsaConfig, float, float]:
    """The config of a paper-era config.json, and its input and output norms."""
    if raw.get("mode") != "top_k":
        raise LorsaSurgeryError(f"Paper-era mode {raw.get('mode')!r:.60} is not supported (only top_k).")
    if raw.get("d_ov_head", 1) != 1 or raw.get("virtual_kv_num", 0):
        raise LorsaSurgeryError("Paper-era checkpoints with d_ov_head > 1 or virtual keys are not supported.")
    for key in ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k", "avg_norm"):
        if raw.get(key) is None:
            raise LorsaSurgeryError(f"Paper-era config lacks {key}.")
    cfg = LorsaConfig(
        d_model=raw["d_model"],
        n_qk_heads=raw["n_qk_heads"],
        d_qk_head=raw["d_qk_head"],
        n_ov_heads=raw["n_ov_heads"],
        act_fn="topk",
        top_k=raw["top_k"],
        topk_score="relu" if raw.get("use_z_relu") else "abs",
        attn_scale=raw.get("attn_scale"),
        positional_embedding_type="rotary" if raw.get("positional_embedding_type") == "rotary" else "none",
        rotary_dim=raw.get("rotary_dim"),
        rotary_base=raw.get("rotary_base") or 10000,
        rotary_adjacent_pairs=bool(raw.get("rotary_adjacent_pairs", False)),
        n_ctx=raw.get("n_ctx", 256),
        input_space="processed",
        host_model=raw.get("model_name"),
        host_layer=raw.get("layer"),
    )
    norms = raw["avg_norm"] if isinstance(raw["avg_norm"], dict) else {}
    return cfg, check_number(norms.get("in"), "avg_norm.in", above=0), check_number(norms.get("out"), "avg_norm.out", above=0)


# ---- shared -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _about(path: Path) -> Iterator[None]:
    """Errors raised inside name `path`, the file being read."""
    try:
        yield
    except LorsaSurgeryError as e:
        raise LorsaSurgeryError(f"{path}: {e}") from None


def _assign(lorsa: nn.Module, tensors: dict[str, torch.Tensor], origin: Path) -> None:
    """Copy tensors read from the file `origin` into the module, refusing missing, unexpected, misshapen or non-finite
    ones (a NaN weight would turn every output it touches into NaN)."""
    expected = lorsa.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise LorsaSurgeryError(f"Weights in {origin} do not match the config: {'; '.join(parts)}.")
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise LorsaSurgeryError(f"Weights in {origin}: {name} is a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise LorsaSurgeryError(
                f"Weights in {origin} contradict the config: {name} has shape {tuple(value.shape)}, "
                f"the config implies {tuple(expected[name].shape)}."
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LorsaSurgeryError(f"Weights in {origin}: {name} holds NaN or infinite values; the checkpoint is damaged.")
    lorsa.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    lorsa.rotary_inv_freq = rotary_inverse_wavelengths(lorsa.cfg)  # derived, so not in the checkpoint
