"""The layering rule: schemas imports neither of the others; mmsent never imports consumer; consumer reaches
mmsent only through its public top-level names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The command line and the benchmarks compose both packages: they may reach the model's CLI and bench modules.
TOOLING_IMPORTS = {("cli.py", "mmsent.cli"), ("bench.py", "mmsent.bench")}


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
    [("schemas", ("mmsent", "consumer", "torch", "confluent_kafka")), ("mmsent", ("consumer", "confluent_kafka"))],
)
def test_lower_layers_do_not_import_upper_ones(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path, module in _imports(package)
        if module.split(".")[0] in forbidden
    ]
    assert not offenders, offenders


def test_consumer_uses_only_the_public_face_of_mmsent() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path, module in _imports("consumer")
        if module.startswith("mmsent.") and (path.name, module) not in TOOLING_IMPORTS
    ]
    assert not offenders, offenders
