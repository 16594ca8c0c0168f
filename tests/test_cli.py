"""The `mmsent` console script: `--help` lists every command without importing torch, and the mounted commands'
summaries are what their own modules say."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections import defaultdict

import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from consumer.cli import MOUNTED, app

SERVICE_COMMANDS = {"consume", "replay", "inspect", "schema"}

# Run in a fresh interpreter: this test process may have torch loaded by other tests.
HELP_PROBE = """
import json, sys
from typer.testing import CliRunner
from consumer.cli import app
result = CliRunner().invoke(app, ["--help"], terminal_width=200)
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "loaded": sorted(m for m in ("torch", "mmsent", "tooling.cli", "consumer.app") if m in sys.modules)}))
"""


def test_help_lists_every_command_without_importing_torch() -> None:
    probe = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(probe.stdout)
    assert seen["exit"] == 0
    assert seen["loaded"] == []  # nothing that loads the model, nor the tooling, was imported
    listed = {line.strip("│ ").split(" ")[0] for line in seen["output"].splitlines() if line.startswith("│ ")}
    assert SERVICE_COMMANDS | set(MOUNTED) <= listed


def test_the_mounted_commands_are_every_command_of_their_modules_with_their_own_summaries() -> None:
    """MOUNTED names every command of mmsent.cli and tooling.cli, each with the first words of its own help."""
    by_module: dict[str, set[str]] = defaultdict(set)
    for mounted in MOUNTED.values():
        by_module[mounted.module].add(mounted.name)
    for module, names in by_module.items():
        group = typer.main.get_command(importlib.import_module(module).app)
        assert isinstance(group, TyperGroup)
        assert set(group.commands) == names, module
        for name in names:
            own_help = " ".join((group.commands[name].help or "").split())
            assert own_help.startswith(MOUNTED[name].summary), (name, own_help)


def test_a_mounted_command_runs_from_its_module() -> None:
    """`mmsent eval --help` is the model's own command (its options), not the listing's stand-in."""
    result = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--model" in result.output and "labelled JSONL or CSV" in result.output
    missing = CliRunner().invoke(app, ["no-such-command"])
    assert missing.exit_code == 2 and "No such command" in missing.output


def test_a_mistyped_command_is_told_the_close_ones_mounted_or_not() -> None:
    runner = CliRunner()
    for typo, meant in (("evl", "eval"), ("consme", "consume"), ("reconcle", "reconcile")):
        result = runner.invoke(app, [typo], terminal_width=200)
        assert result.exit_code == 2, result.output
        assert f"No such command '{typo}'" in result.output and f"'{meant}'" in result.output, result.output
    result = runner.invoke(app, ["zzzz"], terminal_width=200)
    assert result.exit_code == 2 and "Did you mean" not in result.output
