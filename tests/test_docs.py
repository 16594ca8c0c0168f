"""The README documents every setting the consumer reads, and the commands the contract names."""

from __future__ import annotations

from pathlib import Path

from consumer.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [f"MMSENT_{name.upper()}" for name in Settings.model_fields if f"MMSENT_{name.upper()}" not in README]
    assert not missing, f"settings missing from the README: {missing}"


def test_the_readme_opens_with_the_two_commands() -> None:
    head = README[:400]
    assert "make demo" in head and "make test" in head
    for command in ("consume", "demo", "eval", "train", "reconcile", "bench", "schema"):
        assert f"`mmsent {command}" in README, command
