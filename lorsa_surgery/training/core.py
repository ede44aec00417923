"""What the training loops share: steps from a token budget, the learning-rate schedule, the seeded held-out split,
gradient clipping that notices a diverged step, the JSONL metrics log, the progress bar, and the check that a resumed
run continues what it started.

Lorsa training (`trainer`), healing (`healing`) and the multi-hop GPT-J trainer (`multihop.train`) each run their
own loop, with their own config, on these.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from lorsa_surgery.errors import LorsaSurgeryError
from lorsa_surgery.io import files


def steps_for(tokens: int, batch_size: int, context: int) -> int:
    """Optimiser steps that cover `tokens` in batches of batch_size sequences of context tokens (rounded up)."""
    return math.ceil(tokens / (batch_size * context))


def lr_factor(step: int, steps: int, warmup: int, cooldown: int) -> float:
    """The learning rate at `step` (counted from 0) of a run of `steps`, as a fraction of the peak: a linear warm-up
    over the first `warmup` steps, flat, then a linear decay to zero over the last `cooldown` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if cooldown and step >= steps - cooldown:  # a run without a cool-down stays at the peak
        return max(0.0, (steps - step) / cooldown)
    return 1.0


def held_out_split(n_sequences: int, eval_tokens: int, context: int, seed: int) -> tuple[list[int], list[int]]:
    """(held out, training): a seeded random choice of the sequences that cover `eval_tokens`, in order, which are
    never trained on; the others in the drawn order."""
    n_eval = max(1, eval_tokens // context)
    if n_sequences <= n_eval:
        raise LorsaSurgeryError(f"The text gives {n_sequences} sequences of {context} tokens; need more than the {n_eval} held out.")
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed))
    return order[:n_eval].sort().values.tolist(), order[n_eval:].tolist()


def clip_gradients(parameters: Iterable[torch.Tensor], limit: float) -> float:
    """Clip the gradients' joint norm to `limit` (0: no clipping); the norm before clipping, NaN or infinite after a
    diverged step (a NaN or infinite loss gives one too)."""
    return float(torch.nn.utils.clip_grad_norm_(parameters, limit or math.inf))


def diverged(what: str, step: int, cause: str, lost: str, remedy: str) -> NoReturn:
    """Stop a run whose numbers left the finite: what diverged, when, why, what was not saved and what to change."""
    raise LorsaSurgeryError(f"{what} diverged at step {step} ({cause}), so {lost}; {remedy}.")


class MetricsLog:
    """A run's metrics, one JSON record a line, appended as they come, so a killed run keeps every line written.

    `resume_at` reads back the records up to that step (of an earlier run into the same file) and drops the later
    ones; otherwise the file starts empty. `write` False (processes other than the main one) or no `path` keeps the
    records in memory only.
    """

    def __init__(self, path: str | Path | None, resume_at: int | None = None, write: bool = True):
        self.path = None if path is None else Path(path)
        self.write = write and self.path is not None
        self.records: list[dict[str, Any]] = []
        if resume_at is not None and self.path is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, filter(str.strip, lines)) if r["step"] <= resume_at]
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def progress(desc: str, total: int, start: int = 0, enabled: bool = True):
    """The progress bar of a run of `total` steps, from `start` when it resumes; `update(1)` after each step."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True)


def changed_settings(saved: dict[str, Any], config: Any) -> list[str]:
    """The fields of `config` (a dataclass) whose values differ from a run's saved settings, compared as JSON holds
    them (tuples as lists): a run resumes only with the settings it started with."""
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    return sorted(name for name, value in now.items() if saved.get(name) != value)
