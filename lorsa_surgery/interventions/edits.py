"""Head-level interventions: Ablate, Steer and Patch records, position selectors, sets of them, and a recorder.

Records are small JSON-serialisable dataclasses that name heads as users write them (`L3.H1021`, `L3:induction`).
An `InterventionSet` applies its records in order as head hooks on the spliced layers, either for a scope

    with InterventionSet([Ablate("L3.H5"), Steer("L3:induction", clamp=4.0, positions="generated")]).applied(model):
        model.generate(...)

or persistently (`attach(handle)`), so a patched model saves and publishes them. Positions are absolute, read from
the position ids each layer receives, so they stay right under left padding and with the KV cache; "prompt" and
"generated" split at the prompt length recorded when the prompt ran. With no record active no hook is installed and
the splice keeps its fast path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import torch
from torch import nn

from lorsa_surgery.io import files
from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.interventions.heads import HeadRef, HeadSpec, by_layer, mhsa_named, parse_heads, resolve_heads, split_heads
from lorsa_surgery.interventions.mhsa import edit_heads
from lorsa_surgery.lorsa.config import MAX_INDEX, check_number
from lorsa_surgery.host.hooks import HeadContext, add_hooks
from lorsa_surgery.host import state as host_state
from lorsa_surgery.host.arch import arch_for
from lorsa_surgery.host.splicing import Splice, spliced

FORMAT = "lorsa-surgery.interventions"
FORMAT_VERSION = 1

MAX_VALUE = 1e6
"""The largest magnitude of a steering value, mean or cached activation. Trained heads fire in the tens to hundreds,
so this leaves ample room to over-steer on purpose, while what it multiplies stays far from float32 and bfloat16
overflow (about 3e38). float16 holds at most 65504: a larger value is refused when it meets float16 activations, and
an overflow further on stops generation (`_finite_logits`)."""
MAX_POSITIONS = 100_000
"""The most positions one selector may list: more than any context holds, and cheap to match."""
MAX_RECORDS = 10_000
"""The most records one intervention set may hold; each one edits activations at every forward pass."""
MAX_CACHED = 2**27
"""The most entries (rows x positions x heads) cached activations may cover once made dense (512 MiB in float32)."""

# ---- positions -----------------------------------------------------------------------------------------------

Positions = Union[str, int, list[int], range, slice]
"""Which tokens a record acts on: "all", "prompt", "generated", absolute positions (a list, or "3,7"), or a slice
("2:10", "5:", "-3:"). Negative positions count back from the end of each row's prompt: -1 is its last token."""

_NAMED = ("all", "prompt", "generated")


def parse_positions(value: Positions) -> str | list[int]:
    """The canonical, JSON-friendly form of a position selector: a name, a list of ints, or "start:stop[:step]"."""
    if isinstance(value, bool):
        raise LorsaSurgeryError(f"Positions must be all, prompt, generated, a list of ints or a slice, got {value!r}.")
    if isinstance(value, int):
        return _position_list([value])
    if isinstance(value, range):
        return _position_list(value)
    if isinstance(value, slice):
        value = ":".join("" if v is None else str(v) for v in (value.start, value.stop, value.step)).rstrip(":")
        value = value if ":" in value else value + ":"
    if isinstance(value, str):
        text = value.strip()
        if text in _NAMED:
            return text
        try:
            if ":" in text:
                parts = text.split(":")
                if len(parts) > 3:
                    raise ValueError
                numbers = [_position(int(p)) if p.strip() else None for p in parts]
                if len(numbers) == 3 and numbers[2] is not None and numbers[2] <= 0:
                    raise LorsaSurgeryError(f"The step of positions {text!r} must be positive.")
                return ":".join("" if n is None else str(n) for n in numbers)
            return _position_list(text.split(","))
        except LorsaSurgeryError:
            raise
        except ValueError:
            raise LorsaSurgeryError(
                f"Positions {value!r:.80} are not all, prompt, generated, a comma-separated list or a start:stop slice."
            ) from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return _position_list(value)
    raise LorsaSurgeryError(f"Positions must be all, prompt, generated, a list of ints or a slice, got {value!r:.80}.")


def _position(value: int) -> int:
    return check_number(value, "A position", integer=True, minimum=-MAX_INDEX, maximum=MAX_INDEX)


def _position_list(values: Sequence[int | str]) -> list[int]:
    """Positions (ints, or their text) checked and without repeats, in the order given; more than MAX_POSITIONS are
    refused before any is parsed (millions of them took a minute and gigabytes to match)."""
    if len(values) > MAX_POSITIONS:
        raise LorsaSurgeryError(f"{len(values)} positions are more than the {MAX_POSITIONS} one selector may list; use a slice (start:stop).")
    return list(dict.fromkeys(_position(int(v) if isinstance(v, str) else v) for v in values))


def position_mask(
    positions: str | list[int], position_ids: torch.Tensor, prompt_lengths: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """Boolean [B, T] of the tokens a canonical selector picks, or None for all of them.

    `prompt_lengths()` gives each row's prompt length [B]; it is called only by selectors that need it.
    """
    if positions == "all":
        return None
    if positions == "prompt":
        return position_ids < prompt_lengths()[:, None]
    if positions == "generated":
        return position_ids >= prompt_lengths()[:, None]

    def absolute(v: int | None, default: float) -> torch.Tensor:
        if v is None:
            return torch.full((position_ids.shape[0], 1), default, device=position_ids.device)
        if v < 0:
            return (prompt_lengths() + v)[:, None]
        return torch.full((position_ids.shape[0], 1), v, device=position_ids.device)

    if isinstance(positions, list):
        chosen = torch.tensor(positions, dtype=torch.long, device=position_ids.device)
        mask = torch.isin(position_ids, chosen[chosen >= 0])
        back = chosen[chosen < 0]
        if back.numel():  # counted back from the end of each row's prompt
            ends = prompt_lengths()[:, None] + back
            mask |= torch.stack([torch.isin(row, end) for row, end in zip(position_ids, ends)])
        return mask
    start, stop, step = (positions.split(":") + [""])[:3]
    lo = absolute(int(start) if start else None, 0)
    hi = absolute(int(stop) if stop else None, math.inf)
    mask = (position_ids >= lo) & (position_ids < hi)
    if step and int(step) > 1:
        mask &= (position_ids - lo) % int(step) == 0
    return mask


class _Prompts:
    """Each row's prompt length in the current run of one model, shared by every set applied to it.

    The prompt is what a call without cache history covers, except within generate(), whose first call defines it.
    """

    def __init__(self, model: nn.Module):
        self.lengths: torch.Tensor | None = None
        self.in_generate = False
        self.users = 0
        # generate() is wrapped on the instance, only to mark where each call begins and ends. Without a cache
        # (use_cache=False) every step of generate() is a forward call that re-runs the whole sequence from position 0,
        # as a new prompt does, and transformers passes nothing that tells the two apart (no cache, no cache_position;
        # 5.18 and 5.25 alike). The calls themselves cannot either: the steps of generate(p, max_new_tokens=2) and then
        # generate(on its output) are, call for call, those of generate(p, max_new_tokens=3). So no forward hook can
        # find the boundary, and a logits processor would have to be added through generate()'s own arguments.
        original = model.generate
        # Weak references: the wrapper lives on the model, and must not keep it alive through a cycle.
        call = weakref.WeakMethod(original) if inspect.ismethod(original) else (lambda: original)
        owner = weakref.ref(model)

        def generate(*args, **kwargs):
            self.lengths, self.in_generate = None, True
            check = owner().register_forward_hook(_finite_logits)
            try:
                return call()(*args, **kwargs)
            finally:
                check.remove()
                self.in_generate = False

        generate.__doc__ = original.__doc__  # not functools.wraps: its __wrapped__ would hold the model strongly
        model.generate = generate

    def observe(self, ctx: HeadContext) -> None:
        if ctx.past_length == 0 and not (self.in_generate and self.lengths is not None):
            # Left padding gives pads position 0, so the largest position id is the row's last real token.
            self.lengths = ctx.position_ids.amax(-1) + 1

    def for_batch(self, batch: int) -> torch.Tensor:
        if self.lengths is None:
            raise LorsaSurgeryError(
                "These positions are relative to the prompt, whose length is recorded when the prompt runs; "
                "apply the interventions before running it."
            )
        if batch != len(self.lengths):
            if batch % len(self.lengths):
                raise LorsaSurgeryError(f"The batch changed from {len(self.lengths)} to {batch} rows since the prompt ran.")
            return self.lengths.repeat_interleave(batch // len(self.lengths))
        return self.lengths


def _finite_logits(model: nn.Module, args: Any, output: Any) -> None:
    """A forward hook on the model during generate() that stops generation whose next-token logits turned NaN or +inf
    under interventions, instead of decoding garbage. One reduction per step: max propagates NaN, and -inf (a token
    ruled out) is allowed."""
    logits = getattr(output, "logits", None)
    top = float(logits[:, -1].amax()) if logits is not None and logits.numel() else 0.0
    if math.isnan(top) or top == math.inf:
        raise LorsaSurgeryError("With the interventions applied the model's logits became NaN or infinite: a steering value "
                                "too large for the model's number format; choose a smaller one.")


def _acquire_prompts(model: nn.Module) -> _Prompts:
    prompts = host_state.get(model, "prompts")
    if prompts is None:
        prompts = _Prompts(model)
        host_state.put(model, "prompts", prompts)
    prompts.users += 1
    return prompts


def _release_prompts(model: nn.Module) -> None:
    prompts = host_state.get(model, "prompts")
    if prompts is None:
        return
    prompts.users -= 1
    if prompts.users == 0:
        host_state.put(model, "prompts", None)
        model.__dict__.pop("generate", None)


# ---- cached activations --------------------------------------------------------------------------------------

Edit = Callable[[torch.Tensor, HeadContext, "torch.Tensor | None"], torch.Tensor]
"""edit(values [B, T, h] of a record's heads in one layer, ctx, mask [B, T] or None) -> new values [B, T, h]."""


@dataclass
class HeadCache:
    """Activations of chosen heads over one run, by absolute position; only non-zero entries are stored."""

    heads: list[str]
    """Head refs (`L3.H5`), one per column."""
    lengths: list[int]
    """Per row, the positions covered: 0 .. length - 1."""
    indices: torch.Tensor
    """[N, 3] (row, position, column) of each stored entry."""
    values: torch.Tensor
    """[N] the activations at those entries."""

    @classmethod
    def from_dense(cls, heads: list[str], dense: torch.Tensor, lengths: list[int]) -> "HeadCache":
        idx = dense.nonzero()
        return cls(list(heads), [int(n) for n in lengths], idx.cpu(), dense[tuple(idx.T)].float().cpu())

    def dense(self) -> torch.Tensor:
        """Activations [rows, max(lengths), len(heads)], zero where a head did not fire."""
        out = torch.zeros(len(self.lengths), max(self.lengths, default=0), len(self.heads))
        out[tuple(self.indices.T)] = self.values
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "lengths": self.lengths, "indices": self.indices.tolist(), "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadCache":
        try:
            lengths = [check_number(n, "Each cached length", integer=True, minimum=0, maximum=MAX_INDEX) for n in d["lengths"]]
            indices = torch.tensor(d["indices"], dtype=torch.long).reshape(-1, 3)
            cache = cls(parse_heads(d["heads"]), lengths, indices, torch.tensor(d["values"], dtype=torch.float32))
        except LorsaSurgeryError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise LorsaSurgeryError("Cached activations need heads, lengths, indices [[row, position, column], ...] and values.") from None
        if len(cache.values) != len(indices):
            raise LorsaSurgeryError(f"Cached activations have {len(indices)} indices but {len(cache.values)} values.")
        if len(lengths) * max(lengths, default=0) * len(cache.heads) > MAX_CACHED:
            raise LorsaSurgeryError(f"Cached activations covering {len(lengths)} rows of up to {max(lengths)} positions and "
                                    f"{len(cache.heads)} heads are more than the {MAX_CACHED} entries allowed.")
        if len(indices):
            rows, positions, columns = indices.T
            if rows.min() < 0 or positions.min() < 0 or columns.min() < 0 or rows.max() >= len(lengths) \
                    or columns.max() >= len(cache.heads) or (positions >= torch.tensor(lengths)[rows]).any():
                raise LorsaSurgeryError("Cached activations have an index [row, position, column] outside their rows, lengths or heads.")
        if len(cache.values) and not bool(cache.values.abs().max() <= MAX_VALUE):  # NaN fails the comparison too
            raise LorsaSurgeryError(f"Cached activation values must be finite numbers of magnitude at most {MAX_VALUE:g}.")
        return cache

    def reader(self, refs: list[HeadRef]) -> Edit:
        """An edit that writes these cached activations at the same absolute positions (row r of a batch of B takes
        cached row r * rows // B, so one cached row serves a whole batch and expanded batches stay aligned)."""
        missing = [str(r) for r in refs if str(r) not in self.heads]
        if missing:
            raise LorsaSurgeryError(f"The cached activations hold no {', '.join(missing)} (they hold {', '.join(self.heads)}).")
        table = self.dense()[..., [self.heads.index(str(r)) for r in refs]]  # [rows, S, h]
        lengths = torch.tensor(self.lengths)

        def edit(values: torch.Tensor, ctx: HeadContext, mask: torch.Tensor | None) -> torch.Tensor:
            B = values.shape[0]
            if B % table.shape[0]:
                raise LorsaSurgeryError(f"Cached activations have {table.shape[0]} rows, which do not divide a batch of {B}.")
            rows = torch.arange(B) * table.shape[0] // B
            pos = ctx.position_ids.cpu()
            beyond = pos >= lengths[rows][:, None]
            if mask is not None:
                beyond &= mask.cpu()
            if beyond.any():
                raise LorsaSurgeryError(
                    f"The cached run covers positions up to {int(lengths.max()) - 1}, but position {int(pos[beyond].max())} "
                    "was asked; cache a longer run or choose fewer positions."
                )
            picked = table[rows[:, None], pos.clamp(max=table.shape[1] - 1)]  # [B, T, h]
            return picked.to(device=values.device, dtype=values.dtype)

        return edit


# ---- records --------------------------------------------------------------------------------------------------


def _finite(name: str, value: float | None) -> float | None:
    return None if value is None else check_number(value, name, minimum=-MAX_VALUE, maximum=MAX_VALUE)


@dataclass
class Ablate:
    """Remove heads: set their activations to zero, to their mean over a reference corpus, or to another prompt's."""

    heads: HeadSpec
    """Head refs (`L3.H5`, `L3.H0-31`) or catalog labels (`L3:induction`)."""
    how: Literal["zero", "mean", "resample"] = "zero"
    """zero; mean (each head's corpus mean, from `means`); resample (the activation another prompt had at the same
    position, from `source`)."""
    positions: Positions = "all"
    """Which tokens to ablate; see `Positions`."""
    means: dict[str, float] | None = None
    """For how="mean": head ref -> mean activation; compute with `lorsa_surgery.analysis.attribution.mean_activations`."""
    source: HeadCache | None = None
    """For how="resample": the other prompts' activations; cache them with `lorsa_surgery.interventions.patching.cache_run`."""

    def __post_init__(self) -> None:
        self.heads = parse_heads(self.heads)
        self.positions = parse_positions(self.positions)
        if self.how not in ("zero", "mean", "resample"):
            raise LorsaSurgeryError(f"Ablation must be zero, mean or resample, got {self.how!r}.")
        if (self.how == "mean") != (self.means is not None):
            raise LorsaSurgeryError("Mean ablation needs means (lorsa_surgery.analysis.attribution.mean_activations), and only it takes them.")
        if (self.how == "resample") != (self.source is not None):
            raise LorsaSurgeryError("Resample ablation needs a source (lorsa_surgery.interventions.patching.cache_run), and only it takes one.")
        if self.source is not None and not isinstance(self.source, HeadCache):
            raise LorsaSurgeryError("Resample ablation needs a source HeadCache (lorsa_surgery.interventions.patching.cache_run).")
        if self.means is not None and not isinstance(self.means, dict):
            raise LorsaSurgeryError(f"Mean ablation needs means as head ref -> number, got {self.means!r:.60}.")
        if self.means is not None:
            self.means = {str(k): _finite(f"The mean of {k}", v) for k, v in self.means.items()}

    def _edit(self, refs: list[HeadRef]) -> Edit:
        if self.how == "resample":
            return self.source.reader(refs)
        if self.how == "zero":
            return lambda values, ctx, mask: torch.zeros_like(values)
        missing = [str(r) for r in refs if str(r) not in self.means]
        if missing:
            raise LorsaSurgeryError(f"Mean ablation has no mean for {', '.join(missing)}.")
        means = torch.tensor([self.means[str(r)] for r in refs])
        return lambda values, ctx, mask: means.to(values).expand_as(values)


@dataclass
class Steer:
    """Push heads: add to, scale or clamp their activations (a clamped head fires even where it did not)."""

    heads: HeadSpec
    """Head refs or catalog labels."""
    add: float | None = None
    """Added to the activation (after `scale`)."""
    scale: float | None = None
    """Multiplies the activation."""
    clamp: float | None = None
    """Replaces the activation; excludes add and scale."""
    positions: Positions = "all"
    """Which tokens to steer; "generated" includes every token generate() produces."""

    def __post_init__(self) -> None:
        self.heads = parse_heads(self.heads)
        self.positions = parse_positions(self.positions)
        self.add, self.scale, self.clamp = (_finite(n, getattr(self, n)) for n in ("add", "scale", "clamp"))
        mhsa = mhsa_named(self.heads) if self.add is not None or self.clamp is not None else []
        if mhsa:  # through an exact copy, a head is pairs of rank-1 parts of opposite sign: an added value cancels
            raise LorsaSurgeryError(
                f"Only scale steers an MHSA head ({mhsa[0]}): adding to or clamping its signed rank-1 parts cancels out; "
                f"scale it ({mhsa[0]}*=2 on the command line), or steer single Lorsa heads (L<layer>.H<index>)."
            )
        if self.clamp is None and self.add is None and self.scale is None:
            raise LorsaSurgeryError("Steer needs add, scale or clamp.")
        if self.clamp is not None and (self.add is not None or self.scale is not None):
            raise LorsaSurgeryError("Steer takes clamp alone, or add and/or scale.")

    def _edit(self, refs: list[HeadRef]) -> Edit:
        clamp = self.clamp
        biggest = max(abs(v) for v in (self.clamp, self.add, self.scale) if v is not None)

        def fits(values: torch.Tensor) -> torch.Tensor:
            # float16 holds at most 65504: a larger value would overflow (or, for clamp, raise inside torch).
            if values.is_floating_point() and biggest > torch.finfo(values.dtype).max:
                raise LorsaSurgeryError(f"Steering value {biggest:g} does not fit the model's {values.dtype} activations "
                                        f"(at most {torch.finfo(values.dtype).max:g}).")
            return values

        if clamp is not None:
            return lambda values, ctx, mask: torch.full_like(fits(values), clamp)
        scale = 1.0 if self.scale is None else self.scale
        add = 0.0 if self.add is None else self.add
        return lambda values, ctx, mask: fits(values) * scale + add


@dataclass
class Patch:
    """Copy heads' activations from a cached source run into this run, at the same absolute positions."""

    heads: HeadSpec
    """Head refs or catalog labels; the source must hold each of them."""
    source: HeadCache
    """The source run's activations (`lorsa_surgery.interventions.patching.cache_run`)."""
    positions: Positions = "all"
    """Which tokens to patch; the source run must reach them."""

    def __post_init__(self) -> None:
        self.heads = parse_heads(self.heads)
        self.positions = parse_positions(self.positions)
        if not isinstance(self.source, HeadCache):
            raise LorsaSurgeryError("Patch needs a source HeadCache (lorsa_surgery.interventions.patching.cache_run).")

    def _edit(self, refs: list[HeadRef]) -> Edit:
        return self.source.reader(refs)


Intervention = Union[Ablate, Steer, Patch]
_TYPES: dict[str, type] = {"ablate": Ablate, "steer": Steer, "patch": Patch}


def parse_steer(text: str) -> Steer:
    """`HEADS=V` clamps, `HEADS+=V` adds, `HEADS*=V` scales: the command line's steering syntax."""
    for op, name in (("+=", "add"), ("*=", "scale"), ("=", "clamp")):
        heads, sep, value = text.partition(op)
        if sep and heads and "=" not in heads.rstrip("+*"):
            try:
                number = float(value)
            except ValueError:
                raise LorsaSurgeryError(f"{value!r:.40} in {text!r:.80} is not a number.") from None
            try:
                return Steer(heads, **{name: number})
            except LorsaSurgeryError as e:
                raise LorsaSurgeryError(f"In {text!r:.60}: {e}") from None
    raise LorsaSurgeryError(f"{text!r} is not HEAD=VALUE (clamp), HEAD+=VALUE (add) or HEAD*=VALUE (scale).")


def _record_to_dict(record: Intervention) -> dict[str, Any]:
    out: dict[str, Any] = {"type": next(k for k, v in _TYPES.items() if isinstance(record, v))}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is not None:
            out[f.name] = value.to_dict() if isinstance(value, HeadCache) else value
    return out


def _record_summary(record: Intervention) -> dict[str, Any]:
    """A record as `to_dict` gives it, with cached activations reduced to what they cover (not their values)."""
    out = _record_to_dict(record)
    for name in ("source", "means"):
        value = getattr(record, name, None)
        if isinstance(value, HeadCache):
            out[name] = {"heads": value.heads, "lengths": value.lengths, "stored_entries": len(value.values)}
        elif isinstance(value, dict):
            out[name] = f"{len(value)} head means"
    return out


def _record_from_dict(d: dict[str, Any]) -> Intervention:
    if not isinstance(d, dict) or d.get("type") not in _TYPES:
        raise LorsaSurgeryError(f"Each intervention needs a type of {', '.join(_TYPES)}; got {d!r:.80}.")
    cls = _TYPES[d["type"]]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known - {"type"})
    if unknown:
        raise LorsaSurgeryError(f"Unknown field(s) in a {d['type']} intervention: {', '.join(unknown)}.")
    heads = d.get("heads")
    if not isinstance(heads, str) and not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
        raise LorsaSurgeryError(f"The heads of a {d['type']} intervention must be a string or a list of strings, got {heads!r:.60}.")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    if isinstance(kwargs.get("source"), dict):
        kwargs["source"] = HeadCache.from_dict(kwargs["source"])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise LorsaSurgeryError(f"Malformed {d['type']} intervention: {e}.") from None


# ---- sets -------------------------------------------------------------------------------------------------------


def splice_of(target: Splice | nn.Module, bare: bool = False) -> Splice:
    """The splice handle of a model (or the handle itself). With `bare`, a model with none gets a handle of no layers
    (kept nowhere), through which interventions reach the MHSA heads of its attention layers."""
    handle = target if isinstance(target, Splice) else spliced(target)
    if handle is None and bare and isinstance(target, nn.Module):
        return Splice(target, arch_for(target), "replace")
    if handle is None or not handle.sites:
        raise LorsaSurgeryError("This model has no Lorsa modules spliced; splice them first (lorsa_surgery.splice).")
    return handle


def full_context(ctx: HeadContext, acts: torch.Tensor) -> HeadContext:
    """The context with position ids [B, T] for every row (hosts pass [1, T] for an unpadded batch)."""
    if ctx.position_ids.shape == acts.shape[:2]:
        return ctx
    return dataclasses.replace(ctx, position_ids=ctx.position_ids.expand(acts.shape[:2]))


def _layer_hook(ops: list[tuple[torch.Tensor, Any, Edit]], prompts: _Prompts):
    # Closes over compiled ops and the prompt tracker only: no reference back to the set or the model.
    def hook(acts: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        ctx = full_context(ctx, acts)
        prompts.observe(ctx)
        out = acts.clone()
        for cols, positions, edit in ops:
            cols = cols.to(acts.device)
            values = out[..., cols]
            mask = position_mask(positions, ctx.position_ids, lambda: prompts.for_batch(acts.shape[0]).to(acts.device))
            new = edit(values, ctx, mask).to(values.dtype)
            out[..., cols] = new if mask is None else torch.where(mask[..., None], new, values)
        return out

    return hook


class InterventionSet:
    """Interventions applied together, in order. Compose with `+`; save as JSON; apply for a scope or attach."""

    def __init__(self, records: Iterable[Intervention] = ()):
        self.records: list[Intervention] = list(records)
        for record in self.records:
            if not isinstance(record, tuple(_TYPES.values())):
                raise LorsaSurgeryError(f"{record!r:.60} is not an Ablate, Steer or Patch record.")
        self._attached_to: weakref.ref | None = None

    def __add__(self, other: "InterventionSet | Intervention") -> "InterventionSet":
        return InterventionSet(self.records + (other.records if isinstance(other, InterventionSet) else [other]))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Intervention]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"InterventionSet({self.records!r})"

    # ---- files

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "interventions": [_record_to_dict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InterventionSet":
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("interventions"), list):
            raise LorsaSurgeryError(f"Not a lorsa-surgery intervention spec (expected format {FORMAT!r} and a list of interventions).")
        if check_number(d.get("format_version", 0), "format_version", integer=True, minimum=0) > FORMAT_VERSION:
            raise LorsaSurgeryError("This intervention spec was written by a newer lorsa-surgery; please upgrade.")
        if len(d["interventions"]) > MAX_RECORDS:
            raise LorsaSurgeryError(f"{len(d['interventions'])} interventions are more than the {MAX_RECORDS} one spec may hold.")
        return cls(_record_from_dict(r) for r in d["interventions"])

    def summary(self) -> list[dict[str, Any]]:
        """The records, small: cached activations are described, not listed (`to_dict` keeps everything)."""
        return [_record_summary(r) for r in self.records]

    def describe(self) -> str:
        """One line per record, as a person reads it: `steer L3:induction clamp=4.0 at generated`."""
        lines = []
        for r in self.summary():
            params = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("type", "heads", "positions"))
            lines.append(f"{r['type']} {','.join(r['heads'])}{' ' + params if params else ''} at {r['positions']}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        return files.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "InterventionSet":
        spec = files.read_json(path, expect=dict)
        try:
            return cls.from_dict(spec)
        except LorsaSurgeryError as e:
            raise LorsaSurgeryError(f"{path}: {e}") from None

    # ---- running

    def _install(self, handle: Splice) -> Callable[[], None]:
        """Append one hook per touched layer at its `hook_acts` (for MHSA heads of an unspliced layer, on its attention:
        `lorsa_surgery.interventions.mhsa`); returns the function that takes them out again."""
        ops: dict[int, list[tuple[torch.Tensor, Any, Edit]]] = {}
        on_attention: dict[int, list[tuple[torch.Tensor, Any, Edit]]] = {}  # MHSA heads of unspliced layers
        for record in self.records:
            on_lorsa, direct = split_heads(record.heads, handle)
            for refs, table in ((on_lorsa, ops), (direct, on_attention)):
                for layer, indices in by_layer(refs).items():
                    edit = record._edit([r for r in refs if r.layer == layer])
                    table.setdefault(layer, []).append((torch.tensor(indices), record.positions, edit))
        if not ops and not on_attention:
            return lambda: None
        prompts = _acquire_prompts(handle.model)
        remove_hooks = add_hooks(handle, {f"L{layer}.hook_acts": _layer_hook(layer_ops, prompts) for layer, layer_ops in ops.items()})
        remove_direct = edit_heads(handle.model, handle.arch,
                                   {layer: _layer_hook(layer_ops, prompts) for layer, layer_ops in on_attention.items()})
        model = weakref.ref(handle.model)

        def remove() -> None:
            remove_hooks()
            remove_direct()
            if model() is not None:
                _release_prompts(model())

        return remove

    @contextlib.contextmanager
    def applied(self, target: Splice | nn.Module) -> Iterator[Splice]:
        """Active inside the `with` block, around forward passes and generate() alike; yields the splice handle (one
        of no layers for a model with none spliced, whose MHSA heads the set may still name)."""
        handle = splice_of(target, bare=True)
        remove = self._install(handle)
        try:
            yield handle
        finally:
            remove()

    def attach(self, target: Splice | nn.Module) -> "InterventionSet":
        """Keep these interventions active on a splice until `detach()`; saved with it as `handle.interventions`."""
        handle = splice_of(target)
        if handle.interventions is not None:
            raise LorsaSurgeryError("This splice already has interventions attached; detach them first, or attach their sum.")
        if self._attached_to is not None:
            raise LorsaSurgeryError("This intervention set is already attached to a splice; detach it first.")
        remove = self._install(handle)

        def removed() -> None:
            remove()
            self._attached_to = None

        handle.attach("interventions", self, removed)
        self._attached_to = weakref.ref(handle)  # the set must not keep a splice alive
        return self

    def detach(self) -> None:
        """Take these interventions off the splice they were attached to."""
        handle = self._attached_to() if self._attached_to is not None else None
        if handle is not None:
            handle.detach("interventions")
        self._attached_to = None


# ---- reading activations back ----------------------------------------------------------------------------------


def _real_tokens(pos: torch.Tensor) -> torch.Tensor:
    """[B, T] True for the real tokens of each row of a chunk: the run of positions that ends at the row's last
    largest position. Padding (position 0, left or right of the real tokens, as generate() numbers it) falls outside."""
    T = pos.shape[1]
    last = T - 1 - pos.flip(-1).argmax(-1)  # argmax picks the first maximum, so this is the last one
    first = last - pos.gather(-1, last[:, None])[:, 0]
    t = torch.arange(T, device=pos.device)
    return (t >= first[:, None]) & (t <= last[:, None])


class Recorder:
    """Reads head activations back while the model runs, forward or generate():

        with Recorder(model, "L3.H5,L3.H9") as rec:
            model.generate(...)
        rec.activations()  # [B, S, 2] by absolute position

    Entered after an intervention it sees the edited activations; entered before, the clean ones.
    """

    def __init__(self, target: Splice | nn.Module, heads: HeadSpec):
        self.handle = splice_of(target)
        self.refs = resolve_heads(heads, self.handle)
        self._chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._remove: Callable[[], None] = lambda: None

    def __enter__(self) -> "Recorder":
        def record(chunks: list, cols: torch.Tensor) -> Callable[[torch.Tensor, HeadContext], None]:
            def hook(acts: torch.Tensor, ctx: HeadContext) -> None:
                chunks.append((full_context(ctx, acts).position_ids.detach(), acts[..., cols.to(acts.device)].detach()))

            return hook

        self._remove = add_hooks(self.handle, {f"L{layer}.hook_acts": record(self._chunks.setdefault(layer, []), torch.tensor(indices))
                                               for layer, indices in by_layer(self.refs).items()})
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        self._remove = lambda: None

    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense activations [B, S, len(refs)] and the covered positions [B, S]."""
        if not any(self._chunks.values()):
            raise LorsaSurgeryError("Nothing was recorded: run the model inside the recorder's with block.")
        first = next(c for c in self._chunks.values() if c)
        B = first[0][0].shape[0]
        S = max(int(pos.max()) for chunks in self._chunks.values() for pos, _ in chunks) + 1
        out = torch.zeros(B, S, len(self.refs))
        covered = torch.zeros(B, S, dtype=torch.bool)
        for layer, chunks in self._chunks.items():
            cols = [i for i, r in enumerate(self.refs) if r.layer == layer]
            for pos, acts in chunks:
                if pos.shape[0] != B:
                    raise LorsaSurgeryError("The batch size changed during recording; record one run at a time.")
                b, t = _real_tokens(pos).nonzero(as_tuple=True)
                p = pos[b, t].cpu()
                out[b.cpu()[:, None], p[:, None], torch.tensor(cols)] = acts[b, t].float().cpu()
                covered[b.cpu(), p] = True
        return out, covered

    def activations(self, head: HeadSpec | None = None) -> torch.Tensor:
        """Recorded activations [B, S, len(heads)] by absolute position (zero where a position was not reached);
        with `head` naming one head, [B, S]."""
        out, _ = self._assemble()
        if head is None:
            return out
        refs = resolve_heads(head, self.handle)
        if len(refs) != 1 or refs[0] not in self.refs:
            raise LorsaSurgeryError(f"{head!r} is not one of the recorded heads ({', '.join(map(str, self.refs))}).")
        return out[..., self.refs.index(refs[0])]

    def cache(self) -> HeadCache:
        """The recording as a HeadCache (for Patch and resample ablation)."""
        out, covered = self._assemble()
        lengths = [int(row.nonzero().max()) + 1 if row.any() else 0 for row in covered]
        return HeadCache.from_dense([str(r) for r in self.refs], out, lengths)
