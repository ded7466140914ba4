"""The layering of docs/architecture.md, checked on the source: every import of the packages (module level and inside
functions alike) read with ``ast``, without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "teachers", "students")
MAX_LINES = 400
# modules allowed over MAX_LINES, each with the reason docs/architecture.md gives
LONG_MODULES: dict[str, str] = {}

# what each layer may import of the project (docs/architecture.md)
LAYERS = {
    "distill.core": ("distill.core",),
    "distill.data": ("distill.data", "distill.core.file_cache"),
    "distill.solvers": ("distill.core", "distill.data", "distill.solvers"),
    "distill.engine": ("distill.core", "distill.data", "distill.solvers", "distill.engine", "distill.objectives"),
    "distill.objectives": ("distill.core", "distill.data", "distill.solvers", "distill.engine", "distill.objectives"),
    "distill.eval": ("distill",),
    "distill": ("distill",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to
    ``a.b`` (its ``__init__``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return {m for m in out if m.split(".")[0] in PACKAGES and m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> str:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_function_level_and_package_imports(tmp_path):
    graph = import_graph()
    assert "distill.core.schedules" in graph["distill.core.grids"]
    assert "distill.solvers" in graph["distill.engine.trajectories"]  # from distill.solvers import get_solver, sample
    assert "teachers.sd_pipeline" in graph["teachers"]  # imported inside load_teacher_folder


def test_core_solvers_engine_and_data_know_nothing_of_teachers_or_students():
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith("distill")
           for d in deps if d.split(".")[0] in ("teachers", "students")]
    assert not bad, "; ".join(bad)


def test_each_layer_imports_only_the_layers_below_it():
    bad = [f"{m} ({layer_of(m)}) imports {d}" for m, deps in import_graph().items() if m.startswith("distill")
           for d in deps if not any(d == a or d.startswith(a + ".") for a in LAYERS[layer_of(m)])]
    assert not bad, "; ".join(bad)


def test_objectives_do_not_import_eval():
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith("distill.objectives")
           for d in deps if d.startswith("distill.eval")]
    assert not bad, "; ".join(bad)


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_the_line_budget_without_a_stated_reason():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    long = {m: len(p.read_text().splitlines()) for m, p in source_modules().items()}
    over = {m: n for m, n in long.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    for m in LONG_MODULES:
        assert m in doc, f"{m} is allowed over {MAX_LINES} lines, but docs/architecture.md does not say why"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_are_thin_front_ends(script):
    lines = len((ROOT / "scripts" / script).read_text().splitlines())
    assert lines <= 160, f"scripts/{script} has {lines} lines: its logic belongs in the package"


def test_the_public_entry_points_keep_their_import_paths():
    from distill.data import load_dataset
    from distill.solvers import get_solver, sample
    from students import load_student
    from teachers import load_teacher

    assert all(callable(f) for f in (load_dataset, get_solver, sample, load_student, load_teacher))


def test_every_script_keeps_its_folder_off_the_import_path():
    """`python scripts/x.py` puts scripts/ first on sys.path, where scripts/distill.py hides the distill package: every
    script that imports the project pops that entry before its first project import."""
    missing = []
    for path in sorted((ROOT / "scripts").glob("*.py")):
        text = path.read_text()
        first = min((text.find(s) for s in ("\nfrom distill", "\nimport distill", "\nfrom students", "\nfrom teachers")
                     if text.find(s) >= 0), default=-1)
        if first >= 0 and ".pop(0)" not in text[:first]:
            missing.append(path.name)
    assert not missing, f"scripts importing the project without popping scripts/ off sys.path first: {missing}"
