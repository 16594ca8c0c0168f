"""`mmsent inspect` at the service level: a real broker, a real Redis, a loopback image server, the real HTTP
server; posts and the consumer's outputs on real topics (and once the real consumer, tiny-random, in a thread)."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner

from consumer.cli import app as cli_app
from consumer.inspect import Inspector, UnsafeBind
from consumer.inspect.feed import Charts, Feed
from consumer.inspect.server import CSP
from consumer.inspect.tail import GroupLag
from consumer.kafkaconfig import client_config
from tests.consumerutil import app_in_thread, make_settings, settings_env, wait_until
from tests.imageserver import ImageServer, image, sample_image
from tests.inspectutil import ScoredPost, inspect_settings, publish, topics_for
from tests.kafkautil import committed_offsets, produce

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("netguard")]

PACKAGE = Path(__file__).resolve().parents[1] / "consumer" / "inspect"
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def inspector_for(kafka_bootstrap: str, redis_url: str, unique_name: str) -> Iterator[Any]:
    started: list[Inspector] = []

    def start(**extra: Any) -> tuple[Inspector, Any]:
        topics = topics_for(kafka_bootstrap, unique_name)
        inspector = Inspector(inspect_settings(kafka_bootstrap, topics, redis_url, **extra))
        inspector.start()
        started.append(inspector)
        assert inspector.tail.ready.wait(20), "the tail did not assign its topics"
        return inspector, topics

    yield start
    for inspector in started:
        inspector.stop()


def _snapshot(url: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The first event of the page's stream: the newest cards, newest first."""
    with httpx.Client(timeout=10, **kwargs) as client, client.stream("GET", url + "api/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == "event: snapshot"
        data = next(lines)
        return list(json.loads(data.removeprefix("data: ")))


def _cards(inspector: Inspector, count: int) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(inspector.feed.snapshot()) >= count, 20), inspector.feed.snapshot()
    return inspector.feed.snapshot()


def test_cards_join_captions_and_thumbnails_come_through_the_fetcher(
    inspector_for: Any, kafka_bootstrap: str, image_server: ImageServer
) -> None:
    picture = image_server.route("/cat.jpg", image(sample_image("JPEG", size=(640, 480))))
    inspector, topics = inspector_for()
    posts = [ScoredPost("a", "sunny day at the beach", picture, "positive", 0.8, "positive", "positive"),
             ScoredPost("b", "private image", "http://10.20.30.40/inside.png"),
             ScoredPost("c", HOSTILE, None, "negative", 0.7, "negative", None),
             ScoredPost("d", "a bitter caption", picture, "negative", 0.55, "negative", "positive")]
    publish(kafka_bootstrap, topics, posts)
    cards = {card["post_id"]: card for card in _cards(inspector, 4)}
    assert {pid: cards[pid]["caption"] for pid in cards} == {p.post_id: p.text for p in posts}
    assert [card["post_id"] for card in _snapshot(inspector.url)] == ["d", "c", "b", "a"]  # newest first
    assert cards["d"]["agree"] is False and cards["a"]["agree"] is True and cards["c"]["agree"] is None
    assert cards["a"]["trace_id"] == posts[0].trace_id
    assert cards["a"]["latency_ms"] is not None and cards["a"]["latency_ms"] >= 0
    assert cards["a"]["model_version"] == "t1" and cards["a"]["image_status"] == "ok"
    assert cards["a"]["language"] is None and cards["a"]["language_supported"] is None  # absent from these events

    thumb = httpx.get(inspector.url + f"thumb/{cards['a']['id']}", timeout=10)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    small = Image.open(io.BytesIO(thumb.content))
    assert small.format == "JPEG" and max(small.size) <= 160
    assert image_server.count("/cat.jpg") == 1
    again = httpx.get(inspector.url + f"thumb/{cards['d']['id']}", timeout=10)  # the same URL: no second download
    assert again.status_code == 200 and image_server.count("/cat.jpg") == 1
    # The policy refuses a private address before any I/O (netguard would fail the test on a packet to it).
    assert httpx.get(inspector.url + f"thumb/{cards['b']['id']}", timeout=10).status_code == 404
    assert httpx.get(inspector.url + "thumb/no-such-card", timeout=10).status_code == 404


def test_thumbnails_come_from_the_redis_cache_the_consumer_filled(
    inspector_for: Any, kafka_bootstrap: str, image_server: ImageServer, redis_url: str
) -> None:
    import asyncio

    from consumer.cache import ImageCache

    url = image_server.url("/cached.png")  # never routed: a fetch would get a 404
    asyncio.run(_put(ImageCache(redis_url), url, sample_image("PNG")))
    inspector, topics = inspector_for()
    publish(kafka_bootstrap, topics, [ScoredPost("p", "cached picture", url)])
    (card,) = _cards(inspector, 1)
    response = httpx.get(inspector.url + f"thumb/{card['id']}", timeout=10)
    assert response.status_code == 200 and image_server.count("/cached.png") == 0


async def _put(cache: Any, url: str, data: bytes) -> None:
    await cache.put_images({url: data})
    await cache.aclose()


def test_alerts_carry_their_reason_and_dead_letters_their_code(inspector_for: Any, kafka_bootstrap: str) -> None:
    inspector, topics = inspector_for()
    publish(kafka_bootstrap, topics, [
        ScoredPost("calm", "fine weather", None, "neutral", 0.6),
        ScoredPost("angry", "I hate this", None, "negative", 0.95, alert=True),
        ScoredPost("bad", "x" * 20, dead_letter=("text_too_long", "text: more than 10 characters")),
    ])
    assert wait_until(lambda: (inspector.feed.card("0-1") or {}).get("alert") is True, 20)
    cards = {card["post_id"]: card for card in _cards(inspector, 3)}
    assert len(inspector.feed.snapshot()) == 3, "an event and its alert are one card"
    angry = cards["angry"]
    assert angry["alert"] and angry["reason"]["rule"] == "min_probability" and angry["reason"]["threshold"] == 0.9
    assert angry["caption"] == "I hate this" and angry["label"] == "negative"
    assert not cards["calm"]["alert"]
    letter = cards["bad"]
    assert letter["kind"] == "dead_letter" and letter["error_code"] == "text_too_long"
    assert letter["error_message"] == "text: more than 10 characters" and letter["caption"] == "x" * 20
    assert wait_until(lambda: inspector.feed.charts.totals["alerts"] == 1, 5)
    series = inspector.feed.charts.series(300)
    assert sum(point["events"] for point in series["points"]) == 2
    assert sum(point["dead_letters"].get("text_too_long", 0) for point in series["points"]) == 1
    # It read, and never committed for the consumers' group (nor joined it).
    assert set(committed_offsets(kafka_bootstrap, topics.group, topics.posts).values()) == {-1001}


def test_the_page_is_served_under_a_strict_policy(inspector_for: Any) -> None:
    inspector, _topics = inspector_for()
    page = httpx.get(inspector.url, timeout=10)
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert "<script>" not in page.text and "onerror" not in page.text  # every script is a static file
    for name in ("app.js", "charts.js", "style.css"):
        response = httpx.get(inspector.url + f"static/{name}", timeout=10)
        assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
    script = (PACKAGE / "static" / "app.js").read_text() + (PACKAGE / "static" / "charts.js").read_text()
    assert not re.search(r"(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|eval\(", script)
    assert httpx.get(inspector.url + "static/../__init__.py", timeout=10).status_code == 404
    charts = httpx.get(inspector.url + "api/charts?window=600", timeout=10).json()
    assert charts["window_s"] == 600 and charts["bucket_s"] == 10


def test_a_token_is_required_when_configured(inspector_for: Any) -> None:
    inspector, _topics = inspector_for(inspect_token="s3cret-token")
    assert httpx.get(inspector.url, timeout=10).status_code == 401
    assert httpx.get(inspector.url + "api/charts", timeout=10).status_code == 401
    assert httpx.get(inspector.url + "?token=wrong", timeout=10).status_code == 401
    bearer = httpx.get(inspector.url, headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
    assert bearer.status_code == 200
    with httpx.Client(timeout=10) as client:
        opened = client.get(inspector.url + "?token=s3cret-token", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "httponly" in opened.headers["set-cookie"].lower()
        assert client.get(inspector.url).status_code == 200  # the cookie from now on
        assert _snapshot(inspector.url, cookies=client.cookies) == []


def test_binding_beyond_loopback_needs_a_token(kafka_bootstrap: str, unique_name: str) -> None:
    settings = inspect_settings(kafka_bootstrap, topics_for(kafka_bootstrap, unique_name), None)
    with pytest.raises(UnsafeBind):
        Inspector(settings, host="0.0.0.0")
    result = CliRunner().invoke(cli_app, ["inspect", "--host", "0.0.0.0"], env={"MMSENT_INSPECT_TOKEN": ""})
    assert result.exit_code == 2 and "MMSENT_INSPECT_TOKEN" in result.output
    # With a token it may (checked without binding: check_bind is what start() runs first).
    Inspector(settings.model_copy(update={"inspect_token": SecretStr("t")}), host="0.0.0.0")


def test_the_package_has_no_producer() -> None:
    """It never writes to a topic: nothing in consumer/inspect names a producer or produces."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.alias):
                name = node.name
            if name and ("producer" in name.lower() or name in {"produce", "commit", "send_offsets_to_transaction"}):
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
    assert list(PACKAGE.rglob("*.py")), "the package is where this test looks"


def test_charts_count_every_event_while_the_feed_is_sampled() -> None:
    import asyncio

    def card(i: int, *, alert: bool) -> dict[str, object]:
        return {"id": f"0-{i}", "kind": "event", "alert": alert, "reason": "rule" if alert else None,
                "label": "neutral", "latency_ms": 5, "error_code": None}

    async def run() -> tuple[int, Counter[str]]:
        feed = Feed(feed_rate=10, charts=Charts())
        queue = feed.subscribe()
        # 500 events; 5 of them also alerts, whose copies (another topic) come before their event or after it
        cards = [card(i, alert=False) for i in range(500)]
        for i in (0, 100, 200):
            cards.insert(cards.index(card(i, alert=False)), card(i, alert=True))
        cards += [card(300, alert=True), card(400, alert=True)]
        feed.publish(cards)
        sent = sum(len(queue.get_nowait()) for _ in range(queue.qsize()))
        return sent, feed.charts.totals

    sent, totals = asyncio.run(run())
    assert totals["events"] == 500 and totals["alerts"] == 5
    assert 5 <= sent <= 10 + 10  # the rate's burst, plus the alerts' cards (a copy and its merged event) that always go


def test_group_lag_is_committed_against_end_offsets(
    kafka_bootstrap: str, redis_url: str, unique_name: str, image_server: ImageServer
) -> None:
    """A real consumer (tiny-random) scores posts; the console joins its events and reads the group's lag."""
    picture = image_server.route("/dog.png", image(sample_image("PNG")))
    topics = topics_for(kafka_bootstrap, unique_name)
    settings = inspect_settings(kafka_bootstrap, topics, redis_url)
    admin = AdminClient(client_config(settings))
    lag = GroupLag(settings, lambda _lag: None)
    values = [json.dumps({"post_id": f"r{i}", "text": f"caption number {i}", "image_url": picture if i % 2 else None})
              .encode() for i in range(6)]
    with Inspector(settings) as inspector:
        assert inspector.tail.ready.wait(20)
        produce(kafka_bootstrap, topics.posts, values)
        assert lag.measure(admin) == 6  # nothing committed yet
        env = settings_env(kafka_bootstrap, topics, redis_url, ALERT_TOPIC=topics.alerts)
        with app_in_thread(make_settings(env)):
            cards = _cards(inspector, 6)
            assert wait_until(lambda: lag.measure(admin) == 0, 30)
    assert {card["post_id"]: card["caption"] for card in cards} == {f"r{i}": f"caption number {i}" for i in range(6)}
    assert all(card["model"] and card["label"] in {"negative", "neutral", "positive"} for card in cards)
    # The consumer's own event fields, shown as they come: language (null or a code), whether the modalities agree.
    assert all(card["has_language"] and card["language_supported"] is not None for card in cards)
    assert all(card["agree"] == card["event"]["modalities_agree"] for card in cards)


def test_the_command_serves_until_sigterm_then_exits_0(kafka_bootstrap: str, unique_name: str) -> None:
    topics = topics_for(kafka_bootstrap, unique_name)
    env = {**os.environ, "MMSENT_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "MMSENT_INPUT_TOPIC": topics.posts,
           "MMSENT_OUTPUT_TOPIC": topics.sentiment, "MMSENT_DLQ_TOPIC": topics.dlq, "MMSENT_REDIS_URL": "",
           "MMSENT_INSPECT_PORT": "0", "MMSENT_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "consumer", "inspect"], env=env, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stderr is not None
        line = next(line for line in process.stderr if line.startswith("mmsent inspect: "))
        url = line.removeprefix("mmsent inspect: ").strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url, timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait(10)
