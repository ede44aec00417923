"""Placing spliced models across devices with Accelerate: the device a module computes on and inputs go to, dtypes,
and device maps that count the Lorsa modules each layer will carry (memory limits as users write them, `0=20GiB,cpu=60GiB`,
are read in `settings`, without torch).

A spliced layer keeps its original attention (exact mode runs it; `unsplice` puts it back) and adds a Lorsa
module on the same device, never split from its layer; `infer_device_map` plans for both. Memory per part and
how to place a large host: docs/placement.md.
"""

from __future__ import annotations

import torch
from torch import nn

from lorsa_surgery.host.arch import arch_for, exact_copy
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.settings import DTYPE_NAMES, parse_max_memory  # noqa: F401 (parse_max_memory: read from here too)
from lorsa_surgery.lorsa.config import LorsaConfig
from lorsa_surgery.lorsa.model import Lorsa

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype from its name ("bfloat16"); None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LorsaSurgeryError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: the execution device Accelerate recorded on it when it dispatched the model, else
    the device of its first weights that are not on the meta device, else the CPU."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids belong: the execution device of its input embedding."""
    return execution_device(model.get_input_embeddings())


def lorsa_parameter_count(cfg: LorsaConfig) -> int:
    """Parameters of a Lorsa module with this config (what it weighs, in elements)."""
    qk = 2 * cfg.n_qk_heads * cfg.d_qk_head * (cfg.d_model + 1 + (1 if cfg.use_post_qk_ln else 0))
    ov = cfg.n_ov_heads * (2 * cfg.d_model + 1 + (1 if cfg.act_fn == "jumprelu" else 0))
    return qk + ov + (cfg.d_model if cfg.use_decoder_bias else 0)


class _Reserved(nn.Module):
    """A meta-device stand-in with a Lorsa module's size, so device-map planning counts it with its layer."""

    def __init__(self, n: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, device="meta", dtype=dtype), requires_grad=False)


_RESERVED = "lorsa_reserved"


def _config(empty_model: nn.Module, layer: int, module: Lorsa | LorsaConfig | str) -> LorsaConfig:
    if isinstance(module, Lorsa):
        return module.cfg
    if isinstance(module, LorsaConfig):
        return module
    if module == "from-attention":  # sized on the empty host itself: an exact copy's shape follows the layer
        with torch.device("meta"):
            return exact_copy(empty_model, layer).cfg
    raise LorsaSurgeryError(f"Planning needs a Lorsa module, its config or 'from-attention' for layer {layer}, got {module!r}.")


def infer_device_map(
    empty_model: nn.Module,
    lorsa: dict[int, Lorsa | LorsaConfig | str],
    *,
    max_memory: dict[int | str, str] | None = None,
    lorsa_dtype: torch.dtype | None = None,
) -> dict[str, int | str]:
    """The device map `accelerate.infer_auto_device_map` gives for `empty_model` (built on the meta device in the
    dtype it will load in) with the Lorsa modules of `lorsa` ({layer: module, config or "from-attention"}) in
    place, in `lorsa_dtype` (default:
    the host's): each is reserved on its layer, which is never split. Pass the map to
    `from_pretrained(device_map=...)`, then `splice`: every module lands where it was counted."""
    from accelerate import infer_auto_device_map

    layers = arch_for(empty_model).layer_list(empty_model)
    host_dtype = next(empty_model.parameters()).dtype
    added = []
    for layer, cfg in lorsa.items():
        if not 0 <= layer < len(layers):
            raise LorsaSurgeryError(f"Layer {layer} is out of range: the model has {len(layers)} layers.")
        size = lorsa_parameter_count(_config(empty_model, layer, cfg))
        layers[layer].add_module(_RESERVED, _Reserved(size, lorsa_dtype or host_dtype))
        added.append(layers[layer])
    try:
        no_split = list(getattr(empty_model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(empty_model, max_memory=max_memory, no_split_module_classes=no_split)
    finally:
        for block in added:
            delattr(block, _RESERVED)
    return {name: device for name, device in device_map.items() if not name.endswith(f".{_RESERVED}")}
