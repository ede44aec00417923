"""Text for evaluating and training: the built-in sample, the built-in offline corpus (the Python documentation),
plain-text and JSONL files, a `datasets` dataset, and text sampled from a model itself."""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
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


def load_dataset_texts(name: str, n_chars: int, split: str = "train", field: str = "text") -> list[str]:
    """Documents from a `datasets` dataset ("name" or "name:config"; a Hub id or a local folder of data
    files), streamed until about n_chars characters are read. Needs the optional datasets package."""
    try:
        import datasets
    except ImportError:
        raise LorsaSurgeryError("Reading a dataset needs the datasets package: pip install 'lorsa-surgery[datasets]'.") from None
    path, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(path, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, its own errors)
        raise LorsaSurgeryError(f"Could not load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    docs: list[str] = []
    total = 0
    for row in rows:
        if field not in row:
            raise LorsaSurgeryError(f"Dataset {name!r} has no {field!r} field (it has {', '.join(row)}).")
        docs.append(row[field])
        total += len(row[field])
        if total >= n_chars:
            break
    return docs


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, separator, pad) token ids: BOS opens a sequence (EOS where the tokenizer has no BOS), EOS separates
    documents (BOS where it has no EOS), and padding is the tokenizer's pad token, else the separator."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise LorsaSurgeryError("The tokenizer has neither a BOS nor an EOS token to open sequences with.")
    start = bos if bos is not None else eos
    sep = eos if eos is not None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    return start, sep, pad


def sample_from_model(model, tokenizer, n_tokens: int, seed: int = 0, length: int = 256, batch_size: int = 64,
                      temperature: float = 1.0) -> list[str]:
    """About n_tokens tokens of text sampled from the model itself, each document started from its BOS token.

    Needs no download, so any model can be trained on offline; the text is what the model expects to read.
    Batches of 64 sample 2.7x the tokens a second of batches of 8 on 2 CPU cores (SmolLM2-135M: 201 against 74).
    """
    import torch
    from tqdm.auto import tqdm

    from lorsa_surgery.host.placement import input_device

    start, _, pad = special_ids(tokenizer)
    stop = tokenizer.eos_token_id
    batch_size = max(1, min(batch_size, -(-n_tokens // length)))  # a small request samples no more than it needs
    device = input_device(model)
    docs: list[str] = []
    sampled = 0
    bar = tqdm(total=n_tokens, desc="sample text from the model", unit="tok", dynamic_ncols=True)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while sampled < n_tokens:
            prompt = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature, top_k=0,
                top_p=1.0, max_new_tokens=length, pad_token_id=pad,
            )[:, 1:]
            for row in out.tolist():
                if stop is not None and stop in row:
                    row = row[: row.index(stop)]
                sampled += len(row) + 1
                bar.update(len(row) + 1)
                text = tokenizer.decode(row, skip_special_tokens=True)
                if text.strip():
                    docs.append(text)
    return docs


_DOCUMENTED_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "locale", "logging", "mailbox", "math",
    "mmap", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform",
    "pprint", "queue", "random", "re", "reprlib", "sched", "secrets", "select", "selectors", "shelve", "shutil",
    "signal", "smtplib", "socket", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "tomllib", "trace",
    "traceback", "types", "typing", "unicodedata", "unittest", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.etree.ElementTree", "zipfile", "zoneinfo",
]


BUILTIN_CORPUS = "the Python documentation (language reference and standard-library docstrings)"
"""What `python_documentation` is, for messages and training records."""


def python_documentation() -> list[str]:
    """The built-in offline corpus: the language reference topics behind `help()` and, per well-documented
    standard module, its docstrings of any length worth reading. Every Python installation carries it (about
    1.07 M characters, 267 k SmolLM2 tokens on Python 3.11; the text follows the Python version)."""
    try:
        import pydoc_data.topics
    except ImportError:
        raise LorsaSurgeryError("This Python has no pydoc_data (the documentation behind help()); give training text.") from None
    docs = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    with warnings.catch_warnings():  # reading the standard library is not the user's deprecation to hear about
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _DOCUMENTED_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module this Python lacks (tomllib before 3.11, ssl without OpenSSL)
                continue
            parts = [inspect.getdoc(module) or ""]
            for _, obj in sorted(vars(module).items()):
                if getattr(obj, "__module__", None) != module.__name__ or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                members = [obj] + ([m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)] if inspect.isclass(obj) else [])
                parts += [doc for m in members if len(doc := inspect.getdoc(m) or "") > 200]
            docs.append("\n\n".join(p for p in parts if p))
    return docs


PROSE = "the built-in English prose sample (14 short documents of other domains)"
"""What `prose` is, for messages and records."""


def prose() -> list[str]:
    """The built-in out-of-domain sample: 14 short documents of English prose (a harvest festival, a football match,
    a fairy tale, a train diary, ...), written for this project and far from the Python documentation the
    default modules train on. Training evaluates every module on it (`TrainConfig.ood_texts`)."""
    text = (Path(__file__).parent.parent / "prose.txt").read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n===\n") if doc.strip()]
