"""The package's layers as code: core <- methods <- labs, imports only downward, no cycles, short functions.

* core (``ftbook.*``, ``ftbook.specs.*``) imports nothing above it;
* a method (``ftbook.methods.*``) imports only core;
* a lab (``ftbook.labs.*``) imports core and methods, never another lab.
Every import counts, also one inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ftbook"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The ftbook modules ``path`` imports (absolute or relative, at any depth of the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import zoo` imports the module ftbook.zoo; `from .zoo import load` imports ftbook.zoo
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def layer(module: str) -> str:
    if module.startswith("ftbook.labs."):
        return "lab"
    if module.startswith("ftbook.methods.") and module != "ftbook.methods":
        return "method"
    return "core"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        for target in imports:
            if layer(target) in ("lab", "method") and layer(module) == "core" and target not in (
                    "ftbook.labs", "ftbook.methods"):
                bad.append(f"core module {module} imports {target} (upward)")
            elif layer(module) == "method" and layer(target) != "core":
                bad.append(f"method {module} imports {target} (a method imports only core)")
            elif layer(module) == "lab" and layer(target) == "lab":
                bad.append(f"lab {module} imports lab {target} (sideways)")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the list of modules on it (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_go_only_downward():
    assert layer_violations(import_graph()) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_a_sideways_import_and_a_cycle():
    """The rules above can fail: on a made-up graph with each kind of mistake, each is reported."""
    graph = {"ftbook.train": {"ftbook.labs.ch04_merging"}, "ftbook.methods.merge": {"ftbook.labs.ch02_adapters"},
             "ftbook.labs.ch04_merging": {"ftbook.labs.ch06_forgetting", "ftbook.methods.merge"},
             "ftbook.methods.peft": {"ftbook.methods.merge"},
             "ftbook.models": {"ftbook.zoo"}, "ftbook.zoo": {"ftbook.models"}}
    assert len(layer_violations(graph)) == 4
    assert cycles(graph) == [["ftbook.models", "ftbook.zoo"]]


def test_every_lab_has_a_spec_and_a_notebook_of_the_same_name():
    chapters = PACKAGE.parent / "chapters"
    for lab in sorted((PACKAGE / "labs").glob("ch*.py")):
        slug = lab.stem.removeprefix("ch")
        assert (PACKAGE / "specs" / lab.name).exists(), f"{lab.name} has no spec ftbook/specs/{lab.name}"
        assert (chapters / f"{slug}.ipynb").exists(), f"{lab.name} has no notebook chapters/{slug}.ipynb"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_80_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_training_loop_reads_top_to_bottom():
    """nanoGPT's standard: the loop itself fits on a screen; the details are named helpers."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60
