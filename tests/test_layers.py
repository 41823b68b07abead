"""The package layers of ``[tool.poer_jax.layers]`` in pyproject.toml, checked over the import graph.

Every ``import`` and ``from ... import`` in poer_jax/, scripts/ and configs/ counts, wherever it stands (module
level, inside a function, under ``if TYPE_CHECKING``), and so does ``importlib.import_module("poer_jax...")``
with a literal name. A file belongs to a node: its package under poer_jax/ (``poer_jax/train/loop.py`` ->
``train``), its module for a single-file module (``poer_jax/jsonl.py`` -> ``jsonl``), ``poer_jax`` for the
package's own ``__init__.py`` (the lazy public API), ``scripts`` or ``configs``. An import may go to its own
node, to any node of a lower layer, or to a sibling of its layer only where ``sibling_imports`` lists the
pair; neither the nodes' graph nor the modules' has a cycle. Standard library only (``ast``, ``tomllib``): no
package to install.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "poer_jax"
SOURCES = ("poer_jax", "scripts", "configs")


@dataclass(frozen=True)
class Import:
    source: str  # node of the importing file
    target: str  # node of the imported module
    where: str  # file:line
    module: str  # the imported module's dotted name

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target} (imports {self.module})"


def load_layers(pyproject: Path) -> tuple[list[list[str]], set[tuple[str, str]]]:
    """(layers from the top down, allowed sibling imports) as pyproject.toml declares them."""
    table = tomllib.loads(pyproject.read_text())["tool"]["poer_jax"]["layers"]
    return [list(layer) for layer in table["order"]], {(a, b) for a, b in table["sibling_imports"]}


def node_of_file(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    if parts[0] != PACKAGE:
        return parts[0]  # scripts, configs
    if len(parts) == 2:
        return PACKAGE if parts[1] == "__init__.py" else parts[1].removesuffix(".py")
    return parts[1]


def node_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else PACKAGE


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(path: Path, root: Path) -> list[str]:
    """The dotted parts of the package a file is in (a package's ``__init__.py`` is in that package)."""
    return list(path.relative_to(root).parts[:-1])


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module name) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is the file's package, 2 its parent, ...
                package = _package_of(path, root)
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = {f"{module}.{a.name}" for a in node.names}  # ``from pkg import sub``: the module pkg.sub
            for name in sorted({n if _is_module(n, root) else module for n in names}):
                yield node.lineno, name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "import_module" and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def import_graph(root: Path) -> list[Import]:
    """Every import between two different nodes under ``root``."""
    out = []
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            source = node_of_file(path, root)
            for line, module in imported_modules(path, root):
                target = node_of_module(module)
                if target is not None and target != source:
                    out.append(Import(source, target, f"{path.relative_to(root)}:{line}", module))
    return out


def module_imports(root: Path) -> list[Import]:
    """Every import between two modules of poer_jax (a package's ``__init__`` is the package's module)."""
    out = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        source = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for line, module in imported_modules(path, root):
            if node_of_module(module) is not None and module != source:
                out.append(Import(source, module, f"{path.relative_to(root)}:{line}", module))
    return out


def nodes_of(root: Path) -> set[str]:
    """Every node the sources make up (each package and single-file module of poer_jax/, scripts, configs)."""
    return {node_of_file(p, root) for top in SOURCES for p in (root / top).rglob("*.py")}


def layer_violations(imports: list[Import], layers: list[list[str]], siblings: set[tuple[str, str]]) -> list[str]:
    """One line per import that goes up a layer, to an undeclared sibling, or from / to a node of no layer."""
    level = {node: i for i, layer in enumerate(layers) for node in layer}
    out = []
    for imp in imports:
        if imp.source not in level or imp.target not in level:
            missing = sorted({imp.source, imp.target} - set(level))
            out.append(f"{imp}: {missing} in no layer of [tool.poer_jax.layers]")
        elif level[imp.target] < level[imp.source]:
            out.append(f"{imp}: imports upward (layer {level[imp.source]} -> {level[imp.target]})")
        elif level[imp.target] == level[imp.source] and (imp.source, imp.target) not in siblings:
            out.append(f"{imp}: siblings of layer {level[imp.source]}, and the pair is not in sibling_imports")
    return out


def cycles(imports: list[Import]) -> list[list[str]]:
    """The node cycles (strongly connected components of more than one node), each sorted (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return sorted(found)


@dataclass(frozen=True)
class Project:
    imports: list[Import]
    layers: list[list[str]]
    siblings: set[tuple[str, str]]

    def __repr__(self) -> str:  # pytest prints a failing test's arguments
        return f"Project({len(self.imports)} imports between nodes)"


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(import_graph(ROOT), *load_layers(ROOT / "pyproject.toml"))


def test_nothing_imports_upward(project: Project) -> None:
    assert len(project.imports) > 100  # the graph was read (a few hundred imports between packages)
    bad = layer_violations(project.imports, project.layers, project.siblings)
    assert not bad, "\n".join(bad)


def test_no_cycle_between_packages(project: Project) -> None:
    found = cycles(project.imports)
    assert not found, "import cycles between packages: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_cycle_between_modules() -> None:
    """No two files import each other, directly or around a loop, function-local imports included (as
    plan/build.py, train/builders.py and train/setup.py once did)."""
    found = cycles(module_imports(ROOT))
    assert not found, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_package_has_a_layer(project: Project) -> None:
    layers, siblings = project.layers, project.siblings
    declared = {node for layer in layers for node in layer}
    assert nodes_of(ROOT) <= declared, f"give {sorted(nodes_of(ROOT) - declared)} a layer in [tool.poer_jax.layers]"
    assert not declared - nodes_of(ROOT), f"[tool.poer_jax.layers] names {declared - nodes_of(ROOT)}: no such node"
    assert {node for pair in siblings for node in pair} <= declared


def test_each_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted((ROOT / PACKAGE).glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns" in doc and "May import" in doc, f"{init.relative_to(ROOT)}: say what it owns and may import"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_fails_on_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The checker itself: a function-local upward import, an undeclared sibling import, a relative import, an
    ``import_module`` call and a cycle are each caught; a downward import is not."""
    _write(tmp_path, {
        "poer_jax/__init__.py": "",
        "poer_jax/jsonl.py": "",
        "poer_jax/model/__init__.py": "",
        "poer_jax/model/qwen.py": "def f():\n    from poer_jax.train import loop\n",
        "poer_jax/rl/__init__.py": "from . import update\n",
        "poer_jax/rl/update.py": "from ..model import qwen\nimport poer_jax.jsonl\n",
        "poer_jax/sampler/__init__.py": "import importlib\nimportlib.import_module('poer_jax.rl.update')\n",
        "poer_jax/train/__init__.py": "",
        "poer_jax/train/loop.py": "from poer_jax import rl, model\n",
        "scripts/run.py": "from poer_jax.train.loop import f\n",
    })
    layers = [["scripts"], ["train"], ["sampler", "rl"], ["model"], ["jsonl"]]
    imports = import_graph(tmp_path)
    edges = {(i.source, i.target) for i in imports}
    assert edges == {("model", "train"), ("rl", "model"), ("rl", "jsonl"), ("sampler", "rl"), ("train", "rl"),
                     ("train", "model"), ("scripts", "train")}
    bad = layer_violations(imports, layers, set())
    assert len(bad) == 2, bad
    assert "poer_jax/model/qwen.py:2: model -> train (imports poer_jax.train.loop): imports upward" in bad[0]
    assert "poer_jax/sampler/__init__.py:2: sampler -> rl" in bad[1] and "not in sibling_imports" in bad[1]
    assert layer_violations(imports, layers, {("sampler", "rl")}) == bad[:1]
    assert cycles(imports) == [["model", "rl", "train"]]
