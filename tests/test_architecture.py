"""The pack's imports run one way: no cycle among its modules, and no module outside the tests reaches for another
module's private names (what two modules share is public). Read statically from the source, function-level imports
included, so an import hidden inside a function still counts."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "calibrated_samplers"
# the library and its adapters; the pack's root __init__ (ComfyUI's entry point, which only defines __version__ and,
# inside ComfyUI, loads nodes/) is the top of the graph, not a module of it
PACKAGES = ("samplers", "calibration", "hosts", "nodes", "scripts")
# scripts that import the pack from outside: only their private-name reach is checked
OUTSIDE = ("benchmarks",)


def _modules(root, packages):
    mods = {}
    for top in packages:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _tree(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read())


def _imports(name, path, tree=None):
    """(target module, imported names, node) for every import of the pack in the file, by its dotted name in the
    pack (relative imports resolved; ``calibrated_samplers.x`` read as ``x``)."""
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    for node in ast.walk(tree or _tree(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACK or node.module.startswith(PACK + ".")):
                target = node.module[len(PACK) + 1:]
            else:
                continue
            yield target, [a.name for a in node.names], [a.asname or a.name for a in node.names], node
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACK + "."):
                    yield a.name[len(PACK) + 1:], [], [a.asname] if a.asname else [], node


def _private(part):
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def import_graph(root, packages=PACKAGES):
    """{module: set of pack modules it imports} over ``packages``."""
    mods = _modules(root, packages)
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names, _, _ in _imports(m, path):
            for n in names or [None]:
                full = f"{target}.{n}" if n else target
                dep = full if full in mods else target
                if dep in mods and dep != m:
                    graph[m].add(dep)
    return graph


def cycles(graph):
    """The import cycles of ``graph``, each as the list of its modules (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def private_reaches(root, packages=PACKAGES + OUTSIDE):
    """'file:line: what' for every private name of another pack module imported or read as an attribute of an
    imported pack module (``from .engine import _x``, ``import ...samplers._core``, ``E._x``)."""
    mods = _modules(root, PACKAGES)
    out = []
    for m, path in _modules(root, packages).items():
        aliases, tree = set(), _tree(path)
        for target, names, bound, node in _imports(m, path, tree):
            where = f"{os.path.relpath(path, root)}:{node.lineno}"
            if any(_private(p) for p in target.split(".")):
                out.append(f"{where}: module {target}")
            for n, b in zip(names, bound):
                if _private(n) and target != m:
                    out.append(f"{where}: {target}.{n}")
                if f"{target}.{n}" in mods:
                    aliases.add(b)
            if isinstance(node, ast.Import):
                aliases.update(bound)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                out.append(f"{os.path.relpath(path, root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return out


def test_no_import_cycle_among_the_packs_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 20 and graph["calibration.engine"]  # it read the pack
    assert cycles(graph) == []


def test_no_module_reaches_for_anothers_private_names():
    assert private_reaches(ROOT) == []


@pytest.fixture
def toy(tmp_path):
    def write(files):
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return str(tmp_path)
    return write


def test_the_checks_find_a_cycle_hidden_in_a_function_and_a_private_reach(toy):
    root = toy({"calibration/__init__.py": "",
                "calibration/a.py": "from .b import helper\n",
                "calibration/b.py": "def helper():\n    from . import c\n",
                "calibration/c.py": "from .a import *\nfrom . import d as D\nD._secret\n",
                "calibration/d.py": "_secret = 1\n",
                "calibration/e.py": "from ..samplers._core import x\n",
                "samplers/__init__.py": "",
                "samplers/_core.py": "x = 1\n",
                "benchmarks/run.py": "from calibrated_samplers.calibration.d import _secret\n"})
    assert cycles(import_graph(root)) == [["calibration.a", "calibration.b", "calibration.c"]]
    found = private_reaches(root)
    assert any("c.py:3: D._secret" in f for f in found)
    assert any("e.py:1: module samplers._core" in f for f in found)
    assert any("run.py:1: calibration.d._secret" in f for f in found)
    assert len(found) == 3


def function_lengths(root, packages=PACKAGES):
    """{'path:name': lines} for every function of ``packages``, its docstring included."""
    out = {}
    for m, path in _modules(root, packages).items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{os.path.relpath(path, root)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_functions_stay_short_enough_to_read():
    lengths = function_lengths(ROOT)
    assert lengths["calibration/engine.py:calibrate"] < 60  # a pipeline of stages (engine.STAGES)
    assert {name: n for name, n in lengths.items() if n > 80} == {}


# storage (the file format, which entry serves a run, the library, fingerprints) never reaches the fitting pipeline
STORAGE = ("calibration.file", "calibration.entries", "calibration.library", "calibration.identity")
PIPELINE = ("calibration.engine", "calibration.end_to_end", "calibration.teacher", "calibration.ranges")


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_storage_never_imports_the_fitting_pipeline():
    graph = import_graph(ROOT)
    assert reachable({"a": {"b"}, "b": {"c"}}, "a") == {"b", "c"}  # the walk is transitive
    for module in STORAGE:
        assert module in graph and not reachable(graph, module) & set(PIPELINE), module


def test_every_calibrated_kind_is_one_class_that_says_all_a_kind_must():
    from calibrated_samplers.calibration.kinds import KINDS, Kind
    from calibrated_samplers.samplers import SAMPLERS
    assert {f.kind for f in SAMPLERS.values()} - {"plain"} == set(KINDS)
    required = ("fit_units", "fit", "neutral", "scaled", "unchanged_steps", "leaves", "materialize")
    for kind in KINDS.values():
        assert all(getattr(type(kind), k) is not getattr(Kind, k) for k in required), kind.name
