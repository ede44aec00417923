"""No input prints a traceback, runs unbounded or touches a file outside what it writes: a fuzz over every JSON
file of a patched folder and of a reference checkpoint, and bad values for the CLI's flags, command by command."""

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.lorsa.model import Lorsa
from lorsa_surgery.publishing.patched import load_patched
from test_interventions import cli, tiny_folders

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lorsa_reference"
HOSTILE_VALUES = [None, "x", "", -1, 0, 1.5, 1e21, 1e308, True, [], {}, [1, 2], {"a": 1}, "../../outside", "/", "01", "-1",
                  "NaN", 10**30]
"""What a hostile or broken file puts where a value goes; "NaN" is written as the bare JSON extension NaN."""


def leaves(value, path=()):
    """Every place in a JSON value, as key paths (the container itself included)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from leaves(v, (*path, i))


def replaced(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    holder = value
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = new
    return value


def dumped(value) -> str:
    return json.dumps(value).replace('"NaN"', "NaN")


def mutations(text: str, rng: random.Random, n: int):
    """n mutated versions of a JSON text: values swapped at random places, plus broken files."""
    original = json.loads(text)
    places = list(leaves(original))
    yield from ("", "{", "[]", "null", "[" * 200_000 + "]" * 200_000, text[: len(text) // 2], '{"a": NaN}', "\ufeff{}")
    for _ in range(n):
        yield dumped(replaced(original, rng.choice(places), rng.choice(HOSTILE_VALUES)))
    for key in (original if isinstance(original, dict) else {}):  # each key missing in turn
        yield dumped({k: v for k, v in original.items() if k != key})


def snapshot(root: Path, skip: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if skip not in p.parents and p != skip}


def fuzz(folder: Path, names: list[str], load, tmp_path: Path, n: int, seed: int) -> int:
    """Mutate each JSON file of `folder` in a copy and call load(copy); every call must give a result or one
    LorsaSurgeryError, in bounded time, touching nothing outside the copy. The number of cases run."""
    rng = random.Random(seed)
    cases = 0
    for name in names:
        text = (folder / name).read_text()
        for mutated in mutations(text, rng, n):
            work = tmp_path / "case"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(folder, work, symlinks=True)
            (work / name).write_text(mutated)
            before = snapshot(tmp_path, work)
            start = time.perf_counter()
            try:
                load(work)
            except LorsaSurgeryError as e:
                assert "\n" not in str(e) and len(str(e)) < 600, (name, mutated[:200], str(e))
            except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
                raise AssertionError(f"{name} = {mutated[:300]!r} raised {type(e).__name__}: {e}") from e
            assert time.perf_counter() - start < 20, (name, mutated[:200])
            assert snapshot(tmp_path, work) == before, f"{name} = {mutated[:200]!r} touched files outside the folder"
            cases += 1
    return cases


@pytest.fixture
def folders(tmp_path):
    return tiny_folders(tmp_path / "given")


def test_fuzzed_patched_folders_load_or_refuse_in_one_sentence(folders, tmp_path):
    model_dir, lorsa_dir = folders
    out = tmp_path / "given" / "patched"
    args = ["ablate", model_dir, "--lorsa", f"1={lorsa_dir}", "--heads", "L1.H3", "--positions", "0,2", "--prompt", "abc", "--save", out]
    assert cli(*args).exit_code == 0
    names = ["lorsa_surgery.json", "layer_1/lorsa_config.json", "layer_1/head_catalog.json", "interventions.json"]
    cases = fuzz(out, names, lambda work: load_patched(work, base=model_dir), tmp_path, n=30, seed=0)
    assert cases > 150


def test_fuzzed_reference_checkpoints_load_or_refuse_in_one_sentence(tmp_path):
    cases = fuzz(FIXTURES / "a", ["config.json"], lambda work: Lorsa.from_pretrained(work), tmp_path, n=120, seed=1)
    assert cases > 120


def test_inspect_of_fuzzed_folders_prints_no_traceback(folders, tmp_path):
    model_dir, lorsa_dir = folders

    def inspect(work):
        result = cli("inspect", work, "--json")
        assert result.exit_code in (0, 1) and not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
            result.output
        if result.exit_code == 0:
            json.loads(result.output)  # valid JSON: no NaN or Infinity

    fuzz(Path(lorsa_dir), ["lorsa_config.json", "head_catalog.json"], inspect, tmp_path, n=25, seed=2)


# ---- flags -------------------------------------------------------------------------------------------------------------

M, L = "{model}", "1={lorsa}"
BAD_FLAGS = [
    # generate and the interventions
    ["generate", M, "--prompt", ""],
    ["generate", M, "--prompt", "abc", "--max-new-tokens", "0"],
    ["generate", M, "--prompt", "abc", "--max-new-tokens", "-1"],
    ["generate", M, "--prompt", "abc", "--temperature", "nan", "--sample"],
    ["generate", M, "--prompt", "abc", "--chat"],
    ["generate", M, "--prompt", "x" * 400],
    ["generate", M, "--lorsa", L, "--prompt", "abc", "--steer", "L1.H5=1e38"],
    ["generate", M, "--lorsa", L, "--prompt", "abc", "--steer", "L1.H5=nan"],
    ["generate", M, "--lorsa", L, "--prompt", "abc", "--ablate", "L1.H999"],
    ["generate", M, "--lorsa", "1=x", "--lorsa", "01=y", "--prompt", "abc"],
    ["generate", M, "--lorsa", L, "--prompt", "abc", "--interventions", "{tmp}/missing.json"],
    ["ablate", M, "--lorsa", L, "--heads", "L1.H3", "--prompt", ""],
    ["ablate", M, "--lorsa", L, "--heads", "L1.H3", "--prompt", "abc", "--positions", "1e21"],
    ["ablate", M, "--lorsa", L, "--heads", "L1.H-1", "--prompt", "abc"],
    ["ablate", M, "--lorsa", L, "--heads", "L1.H3", "--prompt", "abc", "--save", "{tmp}/given"],
    ["steer", M, "--lorsa", L, "--heads", "L1.H3", "--clamp", "inf", "--prompt", "abc"],
    ["patch", M, "--lorsa", L, "--heads", "L1.H3", "--source", "", "--prompt", "abc"],
    # files in, folders out
    ["replace", M, "--lorsa", L, "--out", "."],
    ["replace", M, "--lorsa", L, "--out", "{tmp}/given/model"],
    ["replace", M, "--lorsa", "1={tmp}/nowhere", "--out", "{tmp}/out"],
    ["inspect", "{tmp}/nowhere"],
    ["inspect", "{model}/config.json"],
    ["push", "{tmp}/nowhere", "--repo-id", "ns/name"],
    ["push", "{lorsa}", "--repo-id", "not a repo id"],
    ["pull", "ns/name:../../x", "--out", "{tmp}/pulled"],
    ["pull", "./nowhere", "--out", "{tmp}/pulled"],
    ["heal", "{tmp}/nowhere", "--out", "{tmp}/healed"],
    ["heal", "{lorsa}", "--out", "{tmp}/healed", "--lr", "nan"],
    ["heal", "{lorsa}", "--out", "{tmp}/healed", "--tokens", "-1"],
    ["train", M, "--layer", "1", "--expansion", "1e9", "--out", "{tmp}/run"],
    ["train", M, "--layer", "1", "--expansion", "inf", "--out", "{tmp}/run"],
    ["train", M, "--layer", "1", "--lr", "inf", "--out", "{tmp}/run"],
    ["train", M, "--layer", "1", "--lr", "nan", "--out", "{tmp}/run"],
    ["train", M, "--layer", "7", "--out", "{tmp}/run"],
    ["train", M, "--layer", "1", "--out", "{tmp}/given/model"],
    # heads
    ["heads", "zpattern", M, "--lorsa", L, "L1.H3", "--prompt", "abc", "--position", "99"],
    ["heads", "zpattern", M, "--lorsa", L, "L1.H3", "--prompt", ""],
    ["heads", "label", "{lorsa}", "L1.H-1", "x"],
    ["heads", "label", "{lorsa}", "L1.H999", "x"],
    ["heads", "label", "{lorsa}", "L2.H1", "x"],
    ["heads", "list", "{tmp}/nowhere"],
    ["heads", "list", "{lorsa}"],
    ["heads", "top", "{lorsa}", "L1.H3"],
    ["heads", "dashboard", "{lorsa}", "L1.H3"],
    ["heads", "scan", M, "--lorsa", L, "--out", "{tmp}/scan", "--max-length", "1"],
    ["heads", "scan", M, "--lorsa", L, "--out", "{tmp}/given/model"],
    ["heads", "detect", M, "--lorsa", L, "--families", "nonsense"],
    ["heads", "detect", M, "--lorsa", L, "--top", "0"],
    ["heads", "causal", M, "--lorsa", L, "--family", "induction", "--heads", "L9.H0"],
    ["heads", "classify", M, "--layers", "9"],
    # the multi-hop testbed and the demo
    ["tasks", "make", "number", "{tmp}/given", "-n", "10"],
    ["tasks", "make", "number", "{tmp}/ex.jsonl", "-n", "-1"],
    ["tasks", "train", "number", "{tmp}/given/model", "--steps", "1"],
    ["tasks", "train", "number", "{tmp}/run", "--lr", "nan"],
    ["tasks", "eval", "{tmp}/nowhere"],
    ["tasks", "extrapolate", "{tmp}/nowhere"],
    ["demo", "--out", "{model}"],
]


@pytest.mark.parametrize("args", BAD_FLAGS, ids=[" ".join(a)[:60] for a in BAD_FLAGS])
def test_bad_flags_give_one_line(folders, tmp_path, args):
    model_dir, lorsa_dir = folders
    args = [a.replace("{model}", model_dir).replace("{lorsa}", lorsa_dir).replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(tmp_path, tmp_path / "none")
    result = cli(*args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    message = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and "Traceback" not in result.output, result.output
    after = snapshot(tmp_path, tmp_path / "none")
    assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}  # refused: nothing written


def test_an_unexpected_error_is_one_line_unless_verbose(folders, monkeypatch):
    import errno

    from lorsa_surgery.publishing import patched

    model_dir, lorsa_dir = folders

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")

    monkeypatch.setattr("lorsa_surgery.cli.run.save_patched", full)
    result = cli("replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", "unused-out", "--max-length", "16")
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == "Error: No space left on device: somewhere (run with --verbose before the command for the traceback)."
    monkeypatch.setattr("lorsa_surgery.cli.run.save_patched", lambda *a, **k: {}["boom"])
    result = cli("replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", "unused-out", "--max-length", "16")
    assert result.exit_code == 1 and "unexpected KeyError: 'boom'" in result.output
    result = cli("--verbose", "replace", model_dir, "--lorsa", f"1={lorsa_dir}", "--out", "unused-out", "--max-length", "16")
    assert isinstance(result.exception, KeyError)  # --verbose lets the traceback through
    assert patched  # the module the CLI would have called is the library's, untouched
