"""The multi-hop testbed (docs/multihop.md): number and letter task generators, tokenizers and solvers.

Each example is 17 input tokens (8 target-window, 8 pre-target, 1 query) plus one answer token. From the
query, follow 1-4 hops to a target-window token:

- number task: the window holds letter symbols, the rest holds integers 1..16; an integer points that
  many positions back; the answer is the window symbol reached.
- letter task: the window holds letter+digit pairs ("c5"), the rest letter+letter pairs ("cf"); from a
  token, jump to the unique earlier token whose left letter is this token's right letter; the answer is
  the window token reached.

`extra` inserts extra window tokens before the answer window (length generalisation); they are never on
the path. Datasets are balanced over hop count, answer and answer position, and every example is checked
by the solver, which only reads the tokens.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorsa_surgery.errors import LorsaSurgeryError

if TYPE_CHECKING:
    import torch

TASKS = ("number", "letter")
WINDOW = 8
"""Target-window tokens in the training format; the answer is always among the last WINDOW of them."""
PRE_TARGET = 8
"""Tokens between the window and the query."""
MAX_HOPS = 4

_LETTERS = list(string.ascii_lowercase)
SYMBOLS = (_LETTERS + [a + b for a in _LETTERS for b in _LETTERS])[:120]
"""Window symbols of the number task: a..z, then two-letter symbols aa, ab, ..."""
INTEGERS = [str(i) for i in range(1, WINDOW + PRE_TARGET + 1)]
"""Pointer tokens of the number task: 1..16."""
PAIR_LETTERS = _LETTERS[:8]
"""Letters a..h of the letter task."""
LETTER_DIGITS = [a + d for a in PAIR_LETTERS for d in "12345678"]
"""Window tokens of the letter task: a1..h8."""
LETTER_LETTERS = [a + b for a in PAIR_LETTERS for b in PAIR_LETTERS]
"""Pre-target and query tokens of the letter task: aa..hh."""


@dataclass
class Example:
    """One multi-hop prompt and its answer."""

    tokens: list[str]
    """Input tokens, the query last."""
    answer: str
    """The window token the hops end on."""
    hops: int
    """Number of hops from the query to the answer."""
    answer_position: int
    """Index of the answer in `tokens`."""


def lookup_alphabet(task: str) -> list[str]:
    """The symbols a symbolic head of the task has to tell apart: the letters a..h that the letter task's hops
    match, the window symbols that the number task copies its answer from. Their count sets
    omega = 2 pi / count in `positional.symbolic_bound`."""
    _check_task(task)
    return SYMBOLS if task == "number" else PAIR_LETTERS


def task_symbols(task: str) -> list[str]:
    """Every token string the task writes, in the order of the toolkit's own vocabulary (id = index)."""
    _check_task(task)
    return SYMBOLS + INTEGERS if task == "number" else LETTER_DIGITS + LETTER_LETTERS


class TaskTokenizer:
    """Maps the task's token strings to ids and back (one id per token string, no specials): the toolkit's own
    vocabulary, or with `token_map` ({symbol: id}, every symbol of the task) the vocabulary of a model trained
    elsewhere."""

    def __init__(self, task: str, token_map: dict[str, int] | None = None):
        self.task = task
        self.vocab = task_symbols(task)
        if token_map is None:
            self._ids = {t: i for i, t in enumerate(self.vocab)}
        else:
            missing = [t for t in self.vocab if t not in token_map]
            if missing:
                raise LorsaSurgeryError(f"The token map lacks {len(missing)} of the {task} task's {len(self.vocab)} "
                                        f"symbols, e.g. {', '.join(map(repr, missing[:5]))}.")
            self._ids = {t: int(token_map[t]) for t in self.vocab}
            if len(set(self._ids.values())) < len(self._ids):
                raise LorsaSurgeryError("The token map gives two task symbols the same token id.")
        self._symbols = {i: t for t, i in self._ids.items()}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: list[str]) -> list[int]:
        try:
            return [self._ids[t] for t in tokens]
        except KeyError as e:
            raise LorsaSurgeryError(f"Token {e.args[0]!r} is not in the {self.task} task's vocabulary.") from None

    def decode(self, ids: list[int] | torch.Tensor) -> list[str]:
        return [self._symbols[int(i)] for i in ids]

    def encode_examples(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids [N, T] and answer ids [N]; all examples must have the same length."""
        import torch  # here, so that the task names and the configs built on them read without torch

        if len({len(e.tokens) for e in examples}) > 1:
            raise LorsaSurgeryError("Examples of different lengths cannot share a batch.")
        ids = torch.tensor([self.encode(e.tokens) for e in examples], dtype=torch.long)
        answers = torch.tensor(self.encode([e.answer for e in examples]), dtype=torch.long)
        return ids, answers


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LorsaSurgeryError(f"Unknown task {task!r}; choose number or letter.")


def check_hops(hops: Sequence[int]) -> None:
    """Raise unless `hops` is a non-empty list of hop counts 1..MAX_HOPS."""
    if not hops or any(h not in range(1, MAX_HOPS + 1) for h in hops):
        raise LorsaSurgeryError(f"Hop counts must be 1 to {MAX_HOPS}, got {list(hops)}.")


def _balanced(rng: random.Random, values: list, n: int) -> list:
    """n draws in which every value appears equally often (up to one), in random order."""
    out = values * (n // len(values)) + rng.sample(values, n % len(values))
    rng.shuffle(out)
    return out


def _path(rng: random.Random, hops: int, answer_position: int, n_window: int) -> list[int]:
    """Positions visited after the query: hops-1 distinct pre-target positions (descending), then the answer."""
    pre = rng.sample(range(n_window, n_window + PRE_TARGET), hops - 1)
    return sorted(pre, reverse=True) + [answer_position]


def _number_example(rng: random.Random, hops: int, answer: str, slot: int, extra: int) -> Example:
    n_window = WINDOW + extra
    query = n_window + PRE_TARGET
    answer_position = extra + slot
    others = [s for s in SYMBOLS if s != answer]
    tokens = rng.choices(others, k=n_window) + [""] * (PRE_TARGET + 1)
    tokens[answer_position] = answer
    for p in range(n_window, query + 1):
        tokens[p] = str(rng.randint(1, min(len(INTEGERS), p)))
    here = query
    for nxt in _path(rng, hops, answer_position, n_window):
        tokens[here] = str(here - nxt)
        here = nxt
    return Example(tokens, answer, hops, answer_position)


def _letter_example(rng: random.Random, hops: int, answer: str, slot: int, extra: int) -> Example:
    n_window = WINDOW + extra
    query = n_window + PRE_TARGET
    answer_position = extra + slot
    # Chain letters appear as a left letter exactly once each (at their path position): the match is unique.
    chain = rng.sample([a for a in PAIR_LETTERS if a != answer[0]], hops - 1) + [answer[0]]
    free = [a for a in PAIR_LETTERS if a not in chain]
    tokens = [rng.choice(free) + rng.choice("12345678") for _ in range(n_window)]
    tokens += [rng.choice(free) + rng.choice(PAIR_LETTERS) for _ in range(PRE_TARGET + 1)]
    tokens[answer_position] = answer
    here = query
    for letter, nxt in zip(chain, _path(rng, hops, answer_position, n_window)):
        tokens[here] = tokens[here][0] + letter
        if nxt != answer_position:
            tokens[nxt] = letter + tokens[nxt][1]
        here = nxt
    return Example(tokens, answer, hops, answer_position)


def generate(task: str, n: int, seed: int | str = 0, extra: int = 0,
             hops: Sequence[int] = tuple(range(1, MAX_HOPS + 1))) -> list[Example]:
    """n examples of `task`, balanced over hop count, answer and answer slot, each checked by its solver.

    `extra` window tokens are inserted before the answer window (length tests); `hops` lists the hop counts
    drawn in equal shares (repeat one to weight it). The same arguments always give the same examples.
    """
    _check_task(task)
    if n < 0 or extra < 0:
        raise LorsaSurgeryError("The number of examples and of extra tokens must be non-negative.")
    check_hops(hops)
    rng = random.Random(f"{task}:{seed}:{extra}")
    answers = SYMBOLS if task == "number" else LETTER_DIGITS
    make = _number_example if task == "number" else _letter_example
    plan = zip(
        _balanced(rng, list(hops), n),
        _balanced(rng, answers, n),
        _balanced(rng, list(range(WINDOW)), n),
    )
    examples = [make(rng, hops, answer, slot, extra) for hops, answer, slot in plan]
    for e in examples:
        if solve(task, e.tokens) != (e.answer, e.hops, e.answer_position):
            raise RuntimeError(f"Generator bug: the solver disagrees on {e}.")
    return examples


def solve_number(tokens: list[str]) -> tuple[str, int, int]:
    """(answer, hops, answer position) of a number-task prompt, following the pointers from the query."""
    here, hops = len(tokens) - 1, 0
    while tokens[here].isdigit():
        here -= int(tokens[here])
        hops += 1
        if here < 0:
            raise LorsaSurgeryError("A pointer in the prompt points before its start.")
    return tokens[here], hops, here


def solve_letter(tokens: list[str]) -> tuple[str, int, int]:
    """(answer, hops, answer position) of a letter-task prompt; raises if a match is missing or not unique."""
    here, hops = len(tokens) - 1, 0
    while not tokens[here][1].isdigit():
        wanted = tokens[here][1]
        matches = [p for p in range(here) if tokens[p][0] == wanted]
        if len(matches) != 1:
            raise LorsaSurgeryError(f"{len(matches)} earlier tokens start with {wanted!r}; exactly one must.")
        here = matches[0]
        hops += 1
    return tokens[here], hops, here


def solve(task: str, tokens: list[str]) -> tuple[str, int, int]:
    """(answer, hops, answer position) of a prompt of either task."""
    _check_task(task)
    return solve_number(tokens) if task == "number" else solve_letter(tokens)


def save_examples(examples: list[Example], path: str | Path) -> Path:
    """Write examples as JSON lines (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    tmp.replace(path)
    return path


def load_examples(path: str | Path) -> list[Example]:
    """Read examples written by `save_examples`."""
    path = Path(path)
    if not path.is_file():
        raise LorsaSurgeryError(f"No examples file at {path}.")
    try:
        return [Example(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError) as e:
        raise LorsaSurgeryError(f"{path} is not an examples file: {e}.") from None
