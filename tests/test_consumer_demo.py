"""`mmsent demo` runs end to end on this machine (embedded broker and Redis, image server, consumer) and sums up."""

from __future__ import annotations

import re

import pytest

from tooling.demo import run_demo

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def test_the_demo_accounts_for_every_record_and_prints_a_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MMSENT_MODEL", "tiny-random")
    assert run_demo(posts=60, live_rows=5) == 0
    out = capsys.readouterr().out
    print(out)

    def figure(name: str) -> int:
        match = re.search(rf"^\s+{re.escape(name)}\s+(\d+)\s*$", out, re.MULTILINE)
        assert match, f"no {name!r} line in the summary"
        return int(match.group(1))

    assert figure("records in") == 65
    assert figure("events out") == 60 and figure("dead letters") == 5
    assert sum(figure(f"label {name}") for name in ("negative", "neutral", "positive")) == 60
    assert figure("image blocked") >= 1 and figure("image ok") >= 1
    assert "posts/s" in out and "latency p50 / p95" in out
    assert re.search(r"^\s+console http://127\.0\.0\.1:\d+/", out, re.MULTILINE), "the console's URL"
    assert re.search(r"console: events / dead letters seen\s+60 / 5\s*$", out, re.MULTILINE)
