"""The package's import graph: no import cycles between modules of unbleed, and no private names imported across
modules.

Every ``import``/``from … import`` statement counts, wherever it stands (top level, inside a function, under
``if TYPE_CHECKING:``): an import deferred into a function still ties the two modules together, and only hides the
cycle until someone moves it. Relative imports are resolved; ``from pkg import name`` is an edge to ``pkg.name``
when that is a module and to ``pkg`` otherwise. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``,
but those implicit parent edges are not counted (every module would otherwise be in a cycle with ``unbleed``).
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "unbleed"


@dataclass(frozen=True)
class Import:
    """One name brought in by one import statement: ``importer`` imports ``name`` (None for ``import x``) from
    ``source`` (the dotted module the statement names, resolved) at ``line``; ``target`` is the package's module it
    depends on."""

    importer: str
    source: str
    name: str | None
    target: str
    line: int


def find_modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``) for every ``.py`` file of ``src/package``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute dotted name that ``from <level dots><module> import …`` inside ``module`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owning_module(name: str, modules) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (``import a.b.c`` depends on ``a.b.c``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in modules:
            return prefix
    return None


def find_imports(modules: dict[str, tuple[Path, bool]]) -> list[Import]:
    """Every import, anywhere in every module, that lands on one of ``modules``."""
    found = []
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _owning_module(alias.name, modules)
                    if target is not None:
                        found.append(Import(module, alias.name, None, target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(module, is_package, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    target = full if full in modules else _owning_module(source, modules)
                    if target is not None:
                        found.append(Import(module, source, alias.name, target, node.lineno))
    return found


def import_graph(modules, imports: list[Import]) -> dict[str, set[str]]:
    """Module → the modules it imports (self-imports left out)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component: [m, …, m]."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]  # back from the last module to the start
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def describe_cycles(modules, imports: list[Import]) -> list[str]:
    """One line per import cycle: its modules, and one cycle spelled out with the line of each import."""
    graph = import_graph(modules, imports)
    where = {}
    for imp in imports:
        where.setdefault((imp.importer, imp.target), imp.line)
    lines = []
    for component in strongly_connected(graph):
        cycle = one_cycle(graph, component)
        steps = " -> ".join(f"{a} (line {where[a, b]})" for a, b in itertools.pairwise(cycle)) + f" -> {cycle[-1]}"
        lines.append(f"{', '.join(component)}: {steps}")
    return lines


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(modules, imports: list[Import]) -> list[str]:
    """``from <a module of the package> import _name`` across modules. A private submodule (``from . import _impl``)
    may be imported by modules of its own package."""
    found = []
    for imp in imports:
        if imp.name is None or not is_private(imp.name) or imp.target == imp.importer:
            continue
        full = f"{imp.source}.{imp.name}"
        if full in modules and imp.importer.rpartition(".")[0] == imp.source:
            continue  # a sibling's private module
        found.append(f"{imp.importer} (line {imp.line}): from {imp.source} import {imp.name}")
    return found


def _package_imports():
    modules = find_modules(SRC, PACKAGE)
    assert f"{PACKAGE}.models" in modules and f"{PACKAGE}.text.tokens" in modules, f"no package found under {SRC}"
    return modules, find_imports(modules)


def test_no_import_cycles():
    cycles = describe_cycles(*_package_imports())
    assert not cycles, "import cycles in src/unbleed:\n" + "\n".join(cycles)


# The layers of the package, lowest first: a module may import from its own layer and those below it, never from
# one above. Each name is a top-level module or subpackage of unbleed ("" is the package's __init__, which only
# imports errors and hands the public names on lazily). A new top-level module or folder must be placed here.
LAYERS = (
    ("errors",),
    ("", "checks", "hub", "stats"),
    ("text",),  # tokenizers, token groups, the prompt parser
    ("testing", "models"),  # pipelines: tiny ones built in-process, and the loader
    ("guidance",),  # the data path's parts: attention capture, conditioning, schedule
    ("methods",),  # one file per method, on guidance's parts
    ("run",),  # the run spec and the one sampler, running a method
    ("io",),  # images and records of runs
    ("eval",),
    ("shapes",),
    ("demo",),
    ("cli",),
    ("__main__",),
)


def layer_of(module: str, package: str, layers) -> int:
    """The index in ``layers`` of ``module``'s top-level name under ``package``."""
    top = module[len(package) + 1:].split(".")[0] if module != package else ""
    for i, names in enumerate(layers):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer: place it in LAYERS")


def upward_imports(modules, imports: list[Import], package: str, layers) -> list[str]:
    """Every import of a module from a layer above its own, one line each."""
    found = []
    for imp in imports:
        low, high = layer_of(imp.importer, package, layers), layer_of(imp.target, package, layers)
        if high > low:
            found.append(f"{imp.importer} (line {imp.line}) imports {imp.target}, a layer above it")
    return found


def test_no_module_imports_from_a_layer_above_it():
    modules, imports = _package_imports()
    violations = upward_imports(modules, imports, PACKAGE, LAYERS)
    assert not violations, "imports that run up the layers of src/unbleed:\n" + "\n".join(violations)


def test_no_private_names_imported_across_modules():
    violations = private_imports(*_package_imports())
    assert not violations, ("private names imported from another module of unbleed (make them public, or move "
                            "them where they are used):\n" + "\n".join(violations))


# --- the checks themselves, on hand-made packages ---

def _write_package(root: Path, files: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    for rel, text in files.items():
        path = root / "fake" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return find_modules(root, "fake")


def test_cycle_finder_reports_cycles_of_every_import_form(tmp_path):
    modules = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import x\n",
        "b.py": "def f():\n    from . import a\n",  # lazy, and `from pkg import module`
        "c.py": "import fake.d\n",
        "d.py": "from fake.e import z\n",
        "sub/__init__.py": "",
        "sub/deep.py": "from ..c import q\n",  # two levels up from a module of a subpackage
        "e.py": "from .sub.deep import w\n",
    })
    imports = find_imports(modules)
    assert strongly_connected(import_graph(modules, imports)) == [
        ["fake.a", "fake.b"], ["fake.c", "fake.d", "fake.e", "fake.sub.deep"]]
    lines = describe_cycles(modules, imports)
    assert lines[0] == "fake.a, fake.b: fake.a (line 1) -> fake.b (line 2) -> fake.a"
    assert lines[1] == ("fake.c, fake.d, fake.e, fake.sub.deep: "
                        "fake.c (line 1) -> fake.d (line 1) -> fake.e (line 1) -> fake.sub.deep (line 1) -> fake.c")


def test_cycle_finder_reports_none_without_a_cycle(tmp_path):
    modules = _write_package(tmp_path, {
        # the package imports a; a imports the *module* b through the package: an edge to fake.b, not to fake
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n\ndef f():\n    return b\n",
        "b.py": "def g():\n    from .sub import helper\n",
        "sub/__init__.py": "from ..c import h as helper\n",
        "c.py": "import os\n\ndef h():\n    return os\n",
        "e.py": "from fake.sub import helper\nimport fake.c\n",  # a name of a package: an edge to the package
    })
    imports = find_imports(modules)
    graph = import_graph(modules, imports)
    assert graph == {"fake": {"fake.a"}, "fake.a": {"fake.b"}, "fake.b": {"fake.sub"}, "fake.sub": {"fake.c"},
                     "fake.c": set(), "fake.e": {"fake.sub", "fake.c"}}
    assert strongly_connected(graph) == []
    assert describe_cycles(modules, imports) == []


def test_private_import_finder(tmp_path):
    modules = _write_package(tmp_path, {
        "__init__.py": "from .a import __version__\n",
        "a.py": "__version__ = '0'\n_hidden = 1\n",
        "b.py": "from .a import _hidden, __version__\nfrom os import _exit\n",
        "_impl.py": "x = 1\n",
        "c.py": "from . import _impl\nfrom ._impl import x\n",
        "sub/__init__.py": "",
        "sub/d.py": "def f():\n    from .. import _impl\n    from ..a import _hidden\n",
    })
    assert private_imports(modules, find_imports(modules)) == [
        "fake.b (line 1): from fake.a import _hidden",
        "fake.sub.d (line 2): from fake import _impl",
        "fake.sub.d (line 3): from fake.a import _hidden",
    ]


def test_layer_check_reports_imports_from_above(tmp_path):
    modules = _write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from .high.top import g\n",  # up two layers, deferred into a function
        "mid/__init__.py": "",
        "mid/a.py": "from ..low import f\nfrom . import b\n",  # down, and within its own layer
        "mid/b.py": "import fake.high\n",  # up to a package
        "high/__init__.py": "",
        "high/top.py": "from fake.mid.a import f\n",
    })
    layers = (("low", ""), ("mid",), ("high",))
    assert upward_imports(modules, find_imports(modules), "fake", layers) == [
        "fake.low (line 2) imports fake.high.top, a layer above it",
        "fake.mid.b (line 1) imports fake.high, a layer above it",
    ]
    with pytest.raises(AssertionError, match="'mid' is in no layer"):
        upward_imports(modules, find_imports(modules), "fake", (("low", ""), ("high",)))
