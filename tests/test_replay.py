"""`mmsent replay` re-scores the posts of a time window into another topic, and `mmsent reconcile --from --to`
checks it: both as real commands, with the `tiny-random` model (random weights: the plumbing, not the scores).

The window is found with ListOffsets by time. noida-db 0.2.3 answers it; Tansu 0.6.0 answers offset 0 whatever the
time, and the replay refuses to plan a window on it rather than replaying the wrong records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from tests.consumerutil import REPO, Topics, post, settings_env
from tests.kafkautil import create_topics, produce, read_all

pytestmark = [pytest.mark.kafka]


def _mmsent(env: dict[str, str], *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MMSENT_")} | env
    try:
        return subprocess.run([sys.executable, "-m", "consumer", *args], cwd=REPO, env=full, capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        pytest.fail(f"mmsent {' '.join(args)} ran past {timeout_s} s:\n{stderr[-4000:]}")


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _three_phases(bootstrap: str, topics: Topics, replayed: str) -> tuple[int, int]:
    """60 posts before the window, 60 in it and 60 after, plus a bad record and a late-stamped one inside its
    offsets; returns the window (ms)."""
    create_topics(bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1, replayed: 2, f"{replayed}.dlq": 1})
    now = int(time.time() * 1000)
    window_from, window_to = now - 200_000, now - 100_000  # recent: inside the broker's retention
    values, stamps = [], []
    for phase, base in (("before", now - 300_000), ("in", window_from), ("after", window_to)):
        for i in range(60):
            values.append(post(f"{phase}{i}", f"{phase} the window, post {i}"))
            stamps.append(base + i * 100)
    values.insert(90, b"not json, inside the window")  # a dead letter of the replay
    stamps.insert(90, window_from + 5_000)
    values.insert(100, post("late", "stamped before the window, written inside it"))  # skipped: out of its time
    stamps.insert(100, now - 250_000)
    produce(bootstrap, topics.posts, values, keys=[b"k%d" % i for i in range(len(values))], timestamps_ms=stamps)
    return window_from, window_to


def test_a_replay_scores_its_window_once_and_reconcile_checks_it(kafka_bootstrap: str, unique_name: str) -> None:
    bootstrap, topics, replayed = kafka_bootstrap, Topics.named(unique_name), f"{unique_name}-replayed"
    window_from, window_to = _three_phases(bootstrap, topics, replayed)
    env = settings_env(bootstrap, topics, None)
    window = ("--from", _rfc3339(window_from), "--to", _rfc3339(window_to))
    done = _mmsent(env, "replay", *window, "--output-topic", replayed)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replay: 62 records" in done.stderr  # 60 posts, the bad record and the late one: the window's offsets

    events = [json.loads(r.value) for r in read_all(bootstrap, replayed)]
    assert sorted(e["post_id"] for e in events) == sorted(f"in{i}" for i in range(60))  # once each
    assert all(e["source"]["topic"] == topics.posts for e in events)
    [letter] = [json.loads(r.value) for r in read_all(bootstrap, f"{replayed}.dlq")]
    assert letter["error"]["code"] == "invalid_json"
    assert read_all(bootstrap, topics.sentiment) == []  # the service's own output is untouched

    checked = _mmsent(env, "reconcile", *window, "--input", topics.posts, "--output", replayed,
                      "--dlq", f"{replayed}.dlq", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr[-2000:]
    totals = json.loads(checked.stdout)["totals"]
    assert (totals["inputs"], totals["events"], totals["dead_letters"], totals["lost"]) == (61, 60, 1, 0)

    again = _mmsent(env, "replay", *window, "--output-topic", replayed)  # the same replay again: it resumes, done
    assert again.returncode == 0 and "replay: 0 records" in again.stderr, again.stderr[-2000:]
    assert len(read_all(bootstrap, replayed)) == 60


def test_on_tansu_a_replay_refuses_to_plan_a_window(tansu_bootstrap: str, unique_name: str) -> None:
    topics, replayed = Topics.named(unique_name), f"{unique_name}-replayed"
    window_from, window_to = _three_phases(tansu_bootstrap, topics, replayed)
    done = _mmsent(settings_env(tansu_bootstrap, topics, None), "replay", "--from", _rfc3339(window_from),
                   "--to", _rfc3339(window_to), "--output-topic", replayed)
    assert done.returncode == 2 and "cannot find records by time" in done.stderr, done.stderr[-2000:]
    assert read_all(tansu_bootstrap, replayed) == []


def test_replay_refuses_a_time_without_a_zone(kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics.named(unique_name)
    done = _mmsent(settings_env(kafka_bootstrap, topics, None), "replay", "--from", "2026-12-01 10:00",
                   "--output-topic", "x")
    assert done.returncode == 2 and "time zone" in done.stderr
