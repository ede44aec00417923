"""Naming Lorsa heads: `L3.H1021`, a range `L3.H0-127`, or a label from the layer's head catalog `L3:induction`.

Parsing happens here and only here. `parse_heads` checks the syntax of what a user wrote and keeps it as written
(so a label stays a label in a saved intervention); `resolve_heads` turns it into concrete heads of a splice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.splicing import Splice

_INDEX = re.compile(r"L(\d+)\.H(\d+)(?:-(\d+))?")
_LABEL = re.compile(r"L(\d+):(\S.*)")


@dataclass(frozen=True, order=True)
class HeadRef:
    """One OV head of the Lorsa module spliced at a layer."""

    layer: int
    """Index of the spliced layer."""
    index: int
    """Index of the OV head in that layer's module."""

    def __str__(self) -> str:
        return f"L{self.layer}.H{self.index}"

    @classmethod
    def parse(cls, text: str) -> "HeadRef":
        """`L3.H5` -> HeadRef(3, 5); anything else (a range, a label) is an error."""
        m = _INDEX.fullmatch(text.strip())
        if not m or m[3] is not None:
            raise LorsaSurgeryError(f"{text!r} is not one head: write L<layer>.H<index>.")
        return cls(int(m[1]), int(m[2]))


HeadSpec = Union[str, HeadRef, Iterable[Union[str, HeadRef]]]
"""Heads as users give them: one string (comma-separated items allowed), a HeadRef, or a list of either."""


def parse_heads(spec: HeadSpec) -> list[str]:
    """The items of a head spec as canonical strings, after checking their syntax; labels are not looked up."""
    items = [spec] if isinstance(spec, (str, HeadRef)) else list(spec)
    out: list[str] = []
    for item in items:
        parts = [str(item)] if isinstance(item, HeadRef) else [p.strip() for p in str(item).split(",")]
        for part in parts:
            m = _INDEX.fullmatch(part)
            if m:
                if m[3] is not None and int(m[3]) < int(m[2]):
                    raise LorsaSurgeryError(f"Head range {part!r} ends before it starts.")
                out.append(part)
            elif _LABEL.fullmatch(part):
                out.append(part)
            else:
                raise LorsaSurgeryError(f"{part!r} is not a head: write L<layer>.H<index>, L<layer>.H<a>-<b> or L<layer>:<label>.")
    if not out:
        raise LorsaSurgeryError("No heads given.")
    return out


def layers_named(spec: HeadSpec) -> list[int]:
    """The layers a head spec names, without looking anything up (so it can be checked before a model loads)."""
    return sorted({int(re.match(r"L(\d+)", item)[1]) for item in parse_heads(spec)})


def resolve_heads(spec: HeadSpec, handle: Splice) -> list[HeadRef]:
    """The heads a spec names in a splice, in the order given, without repeats.

    Raises for a layer that carries no Lorsa module, an index past the module's head count, and a label that no
    head of the layer's catalog carries.
    """
    return resolve_in(spec, lambda layer: (handle[layer].source.cfg.n_ov_heads, handle[layer].source.catalog))


def resolve_in(spec: HeadSpec, module: Callable[[int], tuple[int, dict[int, dict[str, str]]]]) -> list[HeadRef]:
    """`resolve_heads` against any record of the modules: `module(layer)` gives (number of heads, catalog) or raises."""
    refs: list[HeadRef] = []
    for item in parse_heads(spec):
        m = _INDEX.fullmatch(item)
        layer = int(m[1]) if m else int(_LABEL.fullmatch(item)[1])
        n, catalog = module(layer)
        if m:
            first, last = int(m[2]), int(m[3] if m[3] is not None else m[2])
            if last >= n:
                raise LorsaSurgeryError(f"Unknown head L{layer}.H{last}: the Lorsa module at layer {layer} has {n} heads (0..{n - 1}).")
            indices = range(first, last + 1)
        else:
            label = _LABEL.fullmatch(item)[2].strip()
            indices = [h for h, info in sorted(catalog.items()) if info.get("label") == label]
            if not indices:
                known = sorted({info.get("label") for info in catalog.values() if info.get("label")})
                raise LorsaSurgeryError(
                    f"No head of layer {layer} is labelled {label!r} (labels: {', '.join(known) or 'none'})."
                )
        refs.extend(HeadRef(layer, h) for h in indices)
    return list(dict.fromkeys(refs))


def head_name(ref: HeadRef, handle: Splice) -> str:
    """`L3.H5` or, for a head in the catalog, `L3.H5 (induction)`."""
    label = handle[ref.layer].source.catalog.get(ref.index, {}).get("label")
    return f"{ref} ({label})" if label else str(ref)


def by_layer(refs: Iterable[HeadRef]) -> dict[int, list[int]]:
    """Head indices grouped by layer, each group in the order given."""
    groups: dict[int, list[int]] = {}
    for ref in refs:
        groups.setdefault(ref.layer, []).append(ref.index)
    return groups
