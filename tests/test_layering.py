"""The layering rule: schemas imports none of the others; mmsent never imports consumer or tooling; consumer (the
service) never imports tooling and reaches mmsent only through its public top-level names; tooling sits on top.

    tooling ──▶ consumer ──▶ mmsent (public names) ──▶ schemas
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks compose the service and the model: they may reach the model's bench module.
TOOLING_REACHES_INTO_MMSENT = {
    ("bench.py", "mmsent.bench"),
    ("bench.py", "mmsent.devicebench"),
    ("shadowbench.py", "mmsent.bench"),
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
