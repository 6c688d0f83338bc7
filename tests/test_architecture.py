"""The library/application boundary and an import graph without cycles (docs/architecture.md).

Imports are read with ``ast`` from the source files (imports inside functions included), so the test needs no
optional dependency and fails on a hidden lazy import as well as on a top-level one.
"""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mllm_encoder", "llava_patch")
# The applications standing on the library; everything else in mllm_encoder is the library core.
APPLICATIONS = (
    "mllm_encoder.dmu",
    "mllm_encoder.data",
    "mllm_encoder.eval",
    "mllm_encoder.experiments",
    "mllm_encoder.cli",
    "mllm_encoder.__main__",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules() -> Dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO_ROOT / package).rglob("*.py"))}


def imported_names(path: Path, name: str) -> Set[str]:
    """What the file's ``import`` statements name, anywhere in it: ``a.b`` for ``import a.b`` and ``a.b.c`` for
    ``from a.b import c`` (``c`` is a module or a name in ``a.b``), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)  # a module, or a name in module `base`
    return names


def import_graph() -> Dict[str, Set[str]]:
    """First-party module -> the first-party modules it imports (``from pkg import module`` counts as module)."""
    modules = first_party_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            while imported and imported not in modules:  # `from a.b import function` -> module a.b
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def is_application(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPLICATIONS)


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of nodes (first node repeated at the end), or ``[]``."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def package_of(module: str) -> str:
    """The package a module file belongs to (``mllm_encoder.moe.router`` -> ``mllm_encoder.moe``). A package's
    ``__init__`` is a node of its own, the package's front door: ``llava_patch.apply()`` runs the patches of
    ``llava_patch.tower`` and ``llava_patch.compat``, which use ``llava_patch.patching`` below them. The
    ``__main__`` entry module counts as an application of its own."""
    path = first_party_modules()[module]
    if path.name == "__init__.py":
        return f"{module}.__init__"
    if path.name == "__main__.py":
        return module
    return module.rpartition(".")[0]


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from llava_patch import apply\n    from . import sibling\n")
    names = imported_names(source, "mllm_encoder.pkg.mod")
    assert names == {"llava_patch.apply", "mllm_encoder.pkg.sibling"}
    graph = import_graph()
    assert {"llava_patch.tower.zero3", "mllm_encoder.checkpoint"} <= graph[
        "llava_patch.tower.registry"
    ]  # modules by name
    assert "mllm_encoder.dmu.config" in graph["mllm_encoder.dmu.trainer"]  # `from package import module`
    assert "mllm_encoder.moe" in graph["mllm_encoder.modeling_clip_moe"]  # `from package import name`


def test_every_pyproject_entry_point_names_a_definition_in_the_tree():
    """Each console script and entry point of ``pyproject.toml`` names a module of the tree and a top-level function
    or class it defines (read with ``ast``: the optional lmms-eval need not be installed, and an installed copy's
    metadata, which follows only at reinstall, plays no part)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = [project["scripts"], *project["entry-points"].values()]
    targets = sorted(value for group in groups for value in group.values())
    assert "llava_patch.integrations.answerer:LlavaAnswerer" in targets
    modules = first_party_modules()
    for target in targets:
        module, _, attribute = target.partition(":")
        assert module in modules, f"pyproject.toml: {target}: no module {module}"
        tree = ast.parse(modules[module].read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert attribute in defined, f"pyproject.toml: {target}: {module} defines no {attribute}"


def test_the_library_imports_no_application_and_mllm_encoder_never_imports_llava_patch():
    graph = import_graph()
    library = [name for name in graph if name.startswith("mllm_encoder") and not is_application(name)]
    assert {"mllm_encoder.modeling_clip_moe", "mllm_encoder.checkpoint", "mllm_encoder.vision_tower"} <= set(library)
    violations = sorted(
        f"{name} imports {target}"
        for name in library
        for target in graph[name]
        if is_application(target) or target.startswith("llava_patch")
    )
    assert not violations, "the library core must not import the applications or llava_patch:\n" + "\n".join(violations)
    from_applications = sorted(
        f"{name} imports {target}"
        for name in graph
        if is_application(name)
        for target in graph[name]
        if target.startswith("llava_patch")
    )
    assert not from_applications, "mllm_encoder must not import llava_patch:\n" + "\n".join(from_applications)


@pytest.mark.parametrize("level", ["file", "package"])
def test_the_import_graph_has_no_cycle(level):
    graph = import_graph()
    if level == "package":
        packages: Dict[str, Set[str]] = {}
        for name, targets in graph.items():
            source = package_of(name)
            packages.setdefault(source, set()).update(package_of(t) for t in targets if package_of(t) != source)
        graph = packages
    cycle = find_cycle(graph)
    assert not cycle, f"import cycle ({level} level): " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_method_imports_no_experiment():
    """``mllm_encoder.dmu`` (the method) reaches no ``mllm_encoder.experiments`` module, directly or through another
    module, and importing every ``dmu`` module leaves ``sys.modules`` without one."""
    graph = import_graph()
    method = sorted(name for name in graph if name == "mllm_encoder.dmu" or name.startswith("mllm_encoder.dmu."))
    assert "mllm_encoder.dmu.pipeline" in method
    reached, frontier = set(method), list(method)
    while frontier:
        for target in graph[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert not sorted(name for name in reached if name.startswith("mllm_encoder.experiments"))
    code = (
        "import importlib, sys\n"
        f"for name in {method!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('mllm_encoder.experiments')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "[]"
