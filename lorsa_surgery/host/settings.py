"""Placement settings as users write them, dtype names and memory limits (`0=20GiB,cpu=60GiB`), checked without
torch: a config or a command line refuses a bad one before anything loads. `placement` turns them into torch."""

from __future__ import annotations

import re

from lorsa_surgery.errors import LorsaSurgeryError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a host model or a Lorsa module may compute in, by torch's name."""


def parse_max_memory(text: str | dict | None) -> dict[int | str, str] | None:
    """`0=20GiB,cpu=60GiB` -> {0: "20GiB", "cpu": "60GiB"}, as transformers' max_memory takes it."""
    if text is None or isinstance(text, dict):
        return text
    limits: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, amount = part.partition("=")
        device = device.strip()
        if not sep or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", amount.strip(), flags=re.I) or not (
            device.isdigit() or device in ("cpu", "disk") or re.fullmatch(r"(cuda|xpu|mps|npu):\d+", device)
        ):
            raise LorsaSurgeryError(f"{part!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=60GiB).")
        limits[int(device) if device.isdigit() else device] = amount.strip()
    if not limits:
        raise LorsaSurgeryError("max_memory names no device.")
    return limits
