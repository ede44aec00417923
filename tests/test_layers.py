"""The package in layers that import one way: every import, including those inside functions, goes to a module of
the same layer or one below, and no modules import each other in a circle. The README's room map names the same
folders in the same order."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["errors", "io", "lorsa", "host", "interventions", "training", "analysis", "multihop", "publishing", "demo", "cli"]
"""Bottom to top: each layer may import the layers before it, never one after it."""


def module_files() -> dict[str, Path]:
    found = {"lorsa_surgery." + ".".join(p.relative_to(ROOT / "lorsa_surgery").with_suffix("").parts): p
             for p in (ROOT / "lorsa_surgery").rglob("*.py")}
    found.update({f"lorsa_surgery.cli.{p.stem}": p for p in (ROOT / "cli").glob("*.py")})
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports for type hints only (`if TYPE_CHECKING:`) never run, so they cannot make a circle at import time.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module, or the package holding it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    part = module.split(".")[1] if module != "lorsa_surgery" else ""
    return LAYERS.index(part) if part in LAYERS else -1


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def test_every_module_sits_in_a_declared_layer():
    loose = [m for m in graph() if m != "lorsa_surgery" and layer_of(m) < 0]
    assert not loose, f"modules outside the declared layers: {loose}"


def test_imports_go_down_the_layers():
    against = []
    for module, targets in graph().items():
        if module == "lorsa_surgery":  # the facade `import lorsa_surgery as ls` loads names lazily from every layer
            continue
        for target in targets:
            if target != "lorsa_surgery" and layer_of(target) > layer_of(module):
                against.append(f"{module} -> {target}")
        assert "lorsa_surgery" not in targets or module.startswith("lorsa_surgery.cli"), f"{module} imports the facade"
    assert not against, "imports against the layer order:\n" + "\n".join(sorted(against))


def test_no_import_cycles():
    edges = {m: {t for t in ts if t != "lorsa_surgery" and not (t == m.rpartition(".")[0])} for m, ts in graph().items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_readme_room_map_matches_the_folders():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Where things are"):]
    block = block[: block.index("\n## ", 4)]
    named = re.findall(r"^\s*(?:lorsa_surgery/)?([a-z_]+)(?:/|\.py)\s", block, re.M)
    folders = sorted(p.name for p in (ROOT / "lorsa_surgery").iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert [n for n in named if n in LAYERS] == LAYERS, named
    assert set(folders) <= set(named), f"folders missing from the room map: {set(folders) - set(named)}"
