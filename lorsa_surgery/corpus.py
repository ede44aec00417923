"""Text for evaluating and training: the built-in sample, plain-text and JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

from lorsa_surgery.errors import LorsaSurgeryError

BUILTIN_TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk. He checked the oil, trimmed the wick,
and wrote the weather in a small notebook: wind from the west, light rain, three ships passing to the north.
In the morning he walked down to the harbour, where the fishermen were mending their nets and arguing about
the price of cod. His daughter ran the bakery on the corner, and she saved him a loaf of rye bread each day.

A list of prime numbers begins 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47. Every integer
greater than one is either a prime or a product of primes, and that factorisation is unique up to order.
Euclid showed that there are infinitely many primes: multiply any finite list of them, add one, and the
result has a prime factor that was not on the list.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

Mary and John went to the market. Mary bought apples and John bought pears. When they came home, John gave
the pears to Mary, and Mary gave an apple to John. The recipe called for two cups of flour, one egg, a pinch
of salt and a spoon of honey; the oven should be warm but not hot, and the dough should rest for an hour.

The committee met on Tuesday to discuss the budget for the new library. After a long debate, the members
agreed to fund the children's reading room first, then the archive, and finally the rooftop garden, which
the mayor had promised during the election. The vote was seven to two, with one abstention.
"""


def load_texts(paths: list[str | Path] | None = None, jsonl_field: str = "text") -> list[str]:
    """Documents from .txt files (one document per file) and .jsonl files (one per line); the built-in sample if none."""
    if not paths:
        return [BUILTIN_TEXT]
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LorsaSurgeryError(f"Missing file: {path}.")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)[jsonl_field])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise LorsaSurgeryError(f"{path} line {n} is not JSON with a {jsonl_field!r} field.") from None
        else:
            docs.append(path.read_text(encoding="utf-8"))
    return docs
