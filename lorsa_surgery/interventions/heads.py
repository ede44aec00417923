"""Naming heads: a Lorsa head `L3.H1021`, a range `L3.H0-127`, a label from the layer's head catalog `L3:induction`,
a QK group `L3.QK2` (the Lorsa heads that share QK head 2), or an MHSA head of the layer's attention `L3.A2`; groups
and MHSA heads take ranges too (`L3.A0-3`). A name may carry what the tools print after it in parentheses
(`L3.H5 (induction)`, `L3.QK0 (heads 0-31)`), which is dropped.

Parsing happens here and only here. `parse_heads` checks the syntax of what a user wrote and keeps it as written
(so a label stays a label in a saved intervention); `resolve_heads` turns it into concrete heads of a splice.

An MHSA head h stands for QK group h of an exact copy of its layer's attention (`exact_copy`: one QK head per MHSA
head, whose group holds the head's 2 x head-width signed rank-1 parts). On a layer spliced with such a copy it names
those heads; on a layer that carries no Lorsa module, `split_heads` gives the heads a copy would have, and the
interventions act on the original attention through them (`lorsa_surgery.interventions.mhsa`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Union

import torch

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.host.arch import _head_counts, exact_copy
from lorsa_surgery.host.splicing import Splice
from lorsa_surgery.interventions.mhsa import output_projection

_INDEX = re.compile(r"(?P<name>L(\d+)\.(H|QK|A)(\d+)(?:-(\d+))?)(?:\s*\([^()]*\))?")
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
        """`L3.H5` -> HeadRef(3, 5); anything else (a range, a label, a group) is an error."""
        m = _INDEX.fullmatch(text.strip())
        if not m or m[3] != "H" or m[5] is not None:
            raise LorsaSurgeryError(f"{text!r} is not one head: write L<layer>.H<index>.")
        return cls(int(m[2]), int(m[4]))


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
                if m[5] is not None and int(m[5]) < int(m[4]):
                    raise LorsaSurgeryError(f"Head range {part!r} ends before it starts.")
                out.append(m["name"])
            elif _LABEL.fullmatch(part):
                out.append(part)
            else:
                raise LorsaSurgeryError(f"{part!r} is not a head: write L<layer>.H<index>, L<layer>.H<a>-<b>, L<layer>:<label>, "
                                        "a QK group L<layer>.QK<g> or an MHSA head L<layer>.A<h>.")
    if not out:
        raise LorsaSurgeryError("No heads given.")
    return out


def layers_named(spec: HeadSpec) -> list[int]:
    """The layers a head spec names, without looking anything up (so it can be checked before a model loads)."""
    return sorted({int(re.match(r"L(\d+)", item)[1]) for item in parse_heads(spec)})


class ModuleHeads(NamedTuple):
    """What resolving names needs to know of the Lorsa module at one layer."""

    count: int
    """Its number of OV heads."""
    catalog: dict[int, dict[str, str]]
    """Its head catalog: head -> {"label": ..., "note": ...}."""
    group_size: int | None = None
    """OV heads per QK group, for `L3.QK2` (None: QK groups cannot be named)."""
    exact_copy: bool = False
    """Whether it is an exact copy of the layer's attention, whose QK group h is MHSA head h, for `L3.A2`."""


def resolve_heads(spec: HeadSpec, handle: Splice) -> list[HeadRef]:
    """The heads a spec names in a splice, in the order given, without repeats.

    Raises for a layer that carries no Lorsa module, an index past the module's head or group count, a label that
    no head of the layer's catalog carries, and an MHSA head of a layer whose module is not an exact copy.
    """
    items = parse_heads(spec)
    mhsa_layers = {int(m[2]) for m in map(_INDEX.fullmatch, items) if m and m[3] == "A"}

    def module(layer: int) -> ModuleHeads:
        if not handle.sites:
            raise LorsaSurgeryError("This model has no Lorsa modules spliced; splice them first (lorsa_surgery.splice).")
        source = handle[layer].source
        exact = layer in mhsa_layers and is_exact_copy(handle, layer)  # only looked at where an MHSA head is named
        return ModuleHeads(source.cfg.n_ov_heads, source.catalog, source.cfg.group_size, exact)

    return resolve_in(items, module)


def split_heads(spec: HeadSpec, handle: Splice) -> tuple[list[HeadRef], list[HeadRef]]:
    """(heads of the splice's Lorsa modules, heads of exact copies of unspliced layers) that a spec names.

    The second part comes from MHSA heads of layers that carry no Lorsa module: MHSA head h of such a layer gives
    the heads of QK group h of an exact copy of its attention, which edits of the original attention act on
    (`lorsa_surgery.interventions.mhsa`). `handle` may hold no layers at all.
    """
    items = parse_heads(spec)

    def on_attention(item: str) -> bool:
        m = _INDEX.fullmatch(item)
        return m is not None and m[3] == "A" and int(m[2]) not in handle.sites

    direct = [item for item in items if on_attention(item)]
    spliced = [item for item in items if not on_attention(item)]
    return (resolve_heads(spliced, handle) if spliced else [],
            resolve_in(direct, lambda layer: _attention_heads(handle, layer)) if direct else [])


def _attention_heads(handle: Splice, layer: int) -> ModuleHeads:
    """The heads an exact copy of an unspliced layer's attention would have."""
    blocks = handle.arch.layer_list(handle.model)
    if not 0 <= layer < len(blocks):
        raise LorsaSurgeryError(f"Layer {layer} is out of range: the model has {len(blocks)} layers.")
    output_projection(getattr(blocks[layer], handle.arch.attention))  # refused here, before anything is installed
    H, _, hd = _head_counts(handle.model.config)
    return ModuleHeads(2 * H * hd, {}, 2 * hd, exact_copy=True)


_METADATA = {"host_model", "host_revision", "host_layer", "hook_point_in", "hook_point_out", "n_ctx"}
"""Config fields that say where a module comes from, not what it computes."""


def is_exact_copy(handle: Splice, layer: int) -> bool:
    """Whether the module spliced at `layer` is an exact copy of the layer's attention (`exact_copy`): the same
    configuration and weights, so that each MHSA head is one QK group of it."""
    source = handle[layer].source
    try:
        copy = exact_copy(handle.model, layer, source.cfg.input_space)
    except LorsaSurgeryError:
        return False
    computes = lambda lorsa: {k: v for k, v in lorsa.cfg.to_dict().items() if k not in _METADATA}
    theirs, ours = dict(source.named_parameters()), dict(copy.named_parameters())
    # A copy made from the host in float32 and spliced into it loaded in bfloat16 differs by the host's rounding.
    rtol = max(1e-5, 2 * torch.finfo(getattr(handle.model, "dtype", torch.float32)).eps)
    return computes(source) == computes(copy) and theirs.keys() == ours.keys() and all(
        theirs[name].shape == p.shape and torch.allclose(theirs[name].detach().float().cpu(), p, rtol=rtol, atol=1e-6)
        for name, p in ours.items()
    )


_UNKNOWN = {
    "H": "Unknown head L{layer}.H{last}: the Lorsa module at layer {layer} has {n} heads (0..{top}).",
    "QK": "Unknown QK group L{layer}.QK{last}: the Lorsa module at layer {layer} has {n} QK groups (0..{top}).",
    "A": "Unknown MHSA head L{layer}.A{last}: the attention at layer {layer} has {n} heads (0..{top}).",
}


def resolve_in(spec: HeadSpec, module: Callable[[int], tuple]) -> list[HeadRef]:
    """`resolve_heads` against any record of the modules: `module(layer)` gives a `ModuleHeads` (or a tuple of its
    first fields: number of heads, catalog) or raises."""
    refs: list[HeadRef] = []
    for item in parse_heads(spec):
        m = _INDEX.fullmatch(item)
        layer = int(m[2]) if m else int(_LABEL.fullmatch(item)[1])
        heads = ModuleHeads(*module(layer))
        if m:
            kind, first, last = m[3], int(m[4]), int(m[5] if m[5] is not None else m[4])
            width = 1 if kind == "H" else _group_width(kind, item, layer, heads)
            n = heads.count // width
            if last >= n:
                raise LorsaSurgeryError(_UNKNOWN[kind].format(layer=layer, last=last, n=n, top=n - 1))
            indices = range(first * width, (last + 1) * width)
        else:
            label = _LABEL.fullmatch(item)[2].strip()
            indices = [h for h, info in sorted(heads.catalog.items()) if info.get("label") == label]
            if not indices:
                known = sorted({info.get("label") for info in heads.catalog.values() if info.get("label")})
                raise LorsaSurgeryError(
                    f"No head of layer {layer} is labelled {label!r} (labels: {', '.join(known) or 'none'})."
                )
        refs.extend(HeadRef(layer, h) for h in indices)
    return list(dict.fromkeys(refs))


def _group_width(kind: str, item: str, layer: int, heads: ModuleHeads) -> int:
    """The heads one QK group or MHSA head (`kind` QK or A) of the module at `layer` stands for."""
    if kind == "A" and not heads.exact_copy:
        raise LorsaSurgeryError(
            f"{item} is an MHSA head, and the Lorsa module at layer {layer} is not an exact copy of that attention, so no "
            f"group of its heads is that head: splice an exact copy there (--lorsa {layer}=from-attention, "
            f"lorsa_surgery.exact_copy) or leave layer {layer} unspliced to act on its attention directly."
        )
    if heads.group_size is None:
        raise LorsaSurgeryError(f"{item} names a QK group, but the record of layer {layer} gives no group size.")
    return heads.group_size


def mhsa_named(spec: HeadSpec) -> list[str]:
    """The items of a spec that name MHSA heads (`L3.A2`)."""
    return [item for item in parse_heads(spec) if (m := _INDEX.fullmatch(item)) and m[3] == "A"]


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
