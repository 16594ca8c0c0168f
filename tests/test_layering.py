"""The layering rule: schemas imports none of the others; mmsent never imports consumer or tooling; consumer (the
service) never imports tooling and reaches mmsent only through its public top-level names; tooling sits on top.

    tooling ──▶ consumer ──▶ mmsent (public names) ──▶ schemas
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks compose the service and the model: they may reach the model's bench module.
TOOLING_REACHES_INTO_MMSENT = {
    ("bench.py", "mmsent.benchmarks.host"),
    ("bench.py", "mmsent.benchmarks.precision"),
    ("bench.py", "mmsent.benchmarks.device"),
    ("shadowbench.py", "mmsent.benchmarks.host"),
}


def _imports(package: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("schemas", ("mmsent", "consumer", "tooling", "tests", "torch", "confluent_kafka")),
        ("mmsent", ("consumer", "tooling", "tests", "confluent_kafka")),
        ("consumer", ("tooling", "tests", "noida_db", "psutil")),
        ("tooling", ("tests",)),
    ],
)
def test_lower_layers_do_not_import_upper_ones(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path, module in _imports(package)
        if module.split(".")[0] in forbidden
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("package", ["consumer", "tooling"])
def test_only_the_public_face_of_mmsent_is_used(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path, module in _imports(package)
        if module.startswith("mmsent.") and (path.name, module) not in TOOLING_REACHES_INTO_MMSENT
    ]
    assert not offenders, offenders


def test_the_service_mounts_the_tooling_only_by_name() -> None:
    """`consumer/cli.py` mounts `tooling.cli` by its name when it is installed; no import statement reaches it, so
    the container image (which has no tooling package) runs the service."""
    source = (ROOT / "consumer" / "cli.py").read_text()
    assert '"tooling.cli"' in source
    assert not [module for path, module in _imports("consumer") if module.startswith("tooling")]


def test_the_layering_check_sees_a_planted_offender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: a service module that imports a tool is found."""
    (tmp_path / "consumer").mkdir()
    (tmp_path / "consumer" / "oops.py").write_text("from tooling.demo import run_demo\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="consumer/oops.py imports tooling.demo"):
        test_lower_layers_do_not_import_upper_ones("consumer", ("tooling",))


# -- no import circle, no private name across modules ------------------------------------------------------------

# Every package of the tree. A module's edges are the imports that run when it is imported: its body, `if
# TYPE_CHECKING:` blocks included (a circle only a type checker walks is still a circle), function bodies not.
TREE = ("consumer", "mmsent", "schemas", "tooling", "scripts", "tests")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path, packages: Iterable[str]) -> dict[str, ast.Module]:
    """Each module of these packages (dotted name) and its syntax tree."""
    return {module_name(path, root): ast.parse(path.read_text(), filename=str(path))
            for package in packages for path in sorted((root / package).rglob("*.py"))}


def import_time_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module runs: not those inside a function or a lambda."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from import_time_nodes(child)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` an import statement of `importer` loads: for `from a import b`, a.b when it is a
    module, else a (b is a name in it); relative imports resolved."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & known
    base = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    module = ".".join(part for part in (base if node.level else "", node.module or "") if part)
    found = {f"{module}.{alias.name}" for alias in node.names} & known
    return found or ({module} & known)


def import_graph(modules: Mapping[str, ast.Module], packages: set[str]) -> dict[str, set[str]]:
    """Module -> the modules it imports when it is imported (the packages' own modules only)."""
    known = set(modules)
    return {name: {target for node in import_time_nodes(tree)
                   for target in imported_modules(node, name, name in packages, known)} - {name}
            for name, tree in modules.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (its modules, the first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def private_imports(modules: Mapping[str, ast.Module], first_party: Iterable[str]) -> list[str]:
    """Every `from x import _name` of a name of the tree's own modules, wherever it is (functions included)."""
    roots = set(first_party)
    return [f"{name} imports {node.module or '.'}.{alias.name}"
            for name, tree in modules.items() for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").partition(".")[0] in roots)
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def _tree_graph() -> dict[str, set[str]]:
    modules = sources(ROOT, TREE)
    packages = {module_name(path, ROOT) for package in TREE for path in (ROOT / package).rglob("__init__.py")}
    return import_graph(modules, packages)


def test_no_import_circle_in_the_tree() -> None:
    assert find_cycle(_tree_graph()) is None


def test_no_private_name_is_imported_across_modules() -> None:
    assert private_imports(sources(ROOT, TREE), TREE) == []


def test_the_circle_check_finds_a_planted_circle(tmp_path: Path) -> None:
    """A circle through a TYPE_CHECKING import is found; an import inside a function is not an edge."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"], ["a", "c", "b", "a"],
        ["b", "a", "c", "b"], ["c", "b", "a", "c"])
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from pkg import two\n\ndef late():\n    from pkg.three import x\n")
    (package / "two.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .one import y\n")
    (package / "three.py").write_text("import pkg.one\n")
    graph = import_graph(sources(tmp_path, ["pkg"]), {"pkg"})
    assert graph["pkg.one"] == {"pkg.two"} and graph["pkg.two"] == {"pkg.one"} and graph["pkg.three"] == {"pkg.one"}
    assert set(find_cycle(graph) or ()) == {"pkg.one", "pkg.two"}


def test_the_private_name_check_finds_a_planted_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "user.py").write_text(
        "from os import _exit\nfrom pkg.core import __all__, public\n\ndef f():\n    from pkg.core import _helper\n")
    assert private_imports(sources(tmp_path, ["pkg"]), ["pkg"]) == ["pkg.user imports pkg.core._helper"]


# -- mmsent's own layers ----------------------------------------------------------------------------------------

# The model package imports one way, each layer only from itself and the layers before it. The package's face
# (`mmsent/__init__.py`, `from mmsent import ...`) re-exports the Scorer, so it sits with serving; a module directly
# in mmsent/ other than cli.py is core (imaging, textnorm, encoders, model, data, runtime, device, presets, reference).
MMSENT_LAYERS = ("core", "serving", "evaluation", "training", "benchmarks", "cli")


def mmsent_layer(module: str) -> int:
    """The rank in MMSENT_LAYERS of an mmsent module (dotted name): its subpackage, cli, the face or the core."""
    if module == "mmsent":
        return MMSENT_LAYERS.index("serving")
    part = module.split(".")[1]
    return MMSENT_LAYERS.index(part) if part in MMSENT_LAYERS else 0


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import, in an import graph, of an mmsent module by one of a lower layer."""
    def named(module: str) -> str:
        return f"{module} ({MMSENT_LAYERS[mmsent_layer(module)]})"

    return sorted(f"{named(importer)} imports {named(target)}"
                  for importer, targets in graph.items() if importer.partition(".")[0] == "mmsent"
                  for target in targets
                  if target.partition(".")[0] == "mmsent" and mmsent_layer(target) > mmsent_layer(importer))


def deferred_imports(modules: Mapping[str, ast.Module], package: str) -> list[str]:
    """The package's own modules imported inside a function: how a circle or an upward import hides from an import
    graph of what runs at import time. (A slow library imported in a function, with its reason, is not one.)"""
    return sorted(f"{name} imports {target} in {function.name}"
                  for name, tree in modules.items() for function in ast.walk(tree)
                  if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
                  for node in ast.walk(function)
                  for target in ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                  if target.partition(".")[0] == package)


def _mmsent_modules(root: Path) -> tuple[dict[str, ast.Module], set[str]]:
    modules = sources(root, ["mmsent"])
    return modules, {module_name(path, root) for path in (root / "mmsent").rglob("__init__.py")}


def test_mmsent_imports_its_layers_one_way() -> None:
    assert upward_imports(import_graph(*_mmsent_modules(ROOT))) == []


def test_mmsent_imports_none_of_its_modules_inside_a_function() -> None:
    assert deferred_imports(_mmsent_modules(ROOT)[0], "mmsent") == []


def test_the_layer_checks_find_planted_violations(tmp_path: Path) -> None:
    """On a planted graph, then on planted files: an upward import is found, a downward or sideways one is not."""
    graph = {"mmsent.model": {"mmsent.serving.scorer"}, "mmsent.serving.scorer": {"mmsent.model", "mmsent"},
             "mmsent.training.train": {"mmsent.evaluation.metrics", "mmsent.training.loop", "numpy"},
             "mmsent.cli": {"mmsent.benchmarks.host"}}
    assert upward_imports(graph) == ["mmsent.model (core) imports mmsent.serving.scorer (serving)"]
    for package in ("mmsent", "mmsent/serving", "mmsent/training"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "mmsent" / "serving" / "scorer.py").write_text(
        "import numpy\nfrom mmsent.training.train import fit\n\ndef late():\n    from mmsent.cli import app\n")
    (tmp_path / "mmsent" / "training" / "train.py").write_text("from mmsent.serving import scorer\n")
    (tmp_path / "mmsent" / "cli.py").write_text("def main():\n    import mmsent.training.train\n")
    modules, packages = _mmsent_modules(tmp_path)
    assert upward_imports(import_graph(modules, packages)) == [
        "mmsent.serving.scorer (serving) imports mmsent.training.train (training)"]
    assert deferred_imports(modules, "mmsent") == ["mmsent.cli imports mmsent.training.train in main",
                                                   "mmsent.serving.scorer imports mmsent.cli in late"]
