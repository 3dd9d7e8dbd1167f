"""The layout's rules, read from the source (shared/reference/ARCHITECTURE.md: doors open downward only):
no import cycles, no import of another mildnet module hidden in a function body unless it avoids an optional
dependency (and says so), no room importing one it must not know, and no module loading a script by path or
editing sys.path."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mildnet"
SHELL = "mildnet.serving.templates.model"  # the one-file Triton model shell `mildnet export` copies
# (importer prefix, imported prefix): doors that must stay shut.
FORBIDDEN = [("mildnet.data", "mildnet.models"), ("mildnet.weights", "mildnet.models"),
             ("mildnet.evaluate", "mildnet.train"),
             ("mildnet.ops", "mildnet.")]  # but mildnet._C / _build_info: the op's own build


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported mildnet module, line, at module level) for every import of a mildnet module in ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try))
                                        for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import x` imports the submodule x when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rpartition(".")[0]
            if t in MODULES and t != name:
                found.append((t, node.lineno, id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _, at_top in imports(name) if at_top} for name in MODULES}


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in g:
        if v not in index:
            visit(v)
    # A package's __init__ re-exporting its submodules, which import names from the package, is no cycle of
    # rooms: only count cycles that leave one package.
    cross = [c for c in cycles if len({n.rpartition(".")[0] if MODULES[n].name != "__init__.py" else n
                                       for n in c}) > 1]
    assert not cross, cross


@pytest.mark.parametrize("name", list(MODULES))
def test_no_mildnet_import_hidden_in_a_function(name):
    """A function-body import of another mildnet module is allowed only to avoid an optional dependency, with a
    comment on its line saying so (``lazy: ...``)."""
    lines = MODULES[name].read_text().splitlines()
    hidden = [f"{MODULES[name].name}:{line}: {lines[line - 1].strip()}" for t, line, at_top in imports(name)
              if not at_top and "lazy:" not in lines[line - 1]]
    assert not hidden, hidden


@pytest.mark.parametrize("importer,imported", FORBIDDEN)
def test_rooms_do_not_import_what_they_must_not_know(importer, imported):
    bad = [(n, t, line) for n in MODULES if n == importer or n.startswith(importer + ".")
           for t, line, _ in imports(n)
           if t.startswith(imported) and not t.startswith(importer) and not t.startswith("mildnet._")]
    assert not bad, bad


SCRIPTS = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "client").glob("*.py"), *(ROOT / "tests").glob("*.py")])


@pytest.mark.parametrize("path", [module_name(p) if p.is_relative_to(PACKAGE)
                                  else str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_nothing_loads_a_script_by_path_or_edits_sys_path(path):
    file = MODULES[path] if path in MODULES else ROOT / path
    if path == SHELL:  # runs inside Triton's stub, whose interpreter ignores PYTHONPATH: it must add it itself
        text = file.read_text()
        assert "sys.path.insert" in text and "PYTHONPATH" in text and "spec_from_file_location" not in text
        return
    tree = ast.parse(file.read_text())
    calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    if file.name == "test_layout.py":  # names them only to look for them
        calls = []
    bad = [c for c in calls if c.endswith("spec_from_file_location") or c in ("sys.path.insert", "sys.path.append")]
    assert not bad, bad
    # ... nor inside the code a test hands to a subprocess
    assert "sys.path.insert" not in file.read_text() or file.name == "test_layout.py"
