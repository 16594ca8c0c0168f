"""The health server bounded (idle, slow and malformed clients), and `/healthz` following the model stage.

The server is the consumer's real `HealthServer` on loopback. The liveness scenario runs the real `Application` on
a real broker with a real `tiny-random` scorer that a marked post holds up on an event, as a hung model would be.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import psutil
import pytest

from consumer.liveness import ModelProgress
from consumer.metrics import HealthServer, Metrics
from tests.consumerutil import (
    Topics,
    all_committed,
    app_in_thread,
    make_settings,
    post,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.kafkautil import create_topics, produce

IDLE_SOCKETS = 2_000


@contextlib.contextmanager
def health_server(**options: Any) -> Iterator[HealthServer]:
    state = {"ready": True, "live": True}
    server = HealthServer("127.0.0.1", 0, lambda: state["ready"], is_live=lambda: state["live"], **options).start()
    try:
        yield server
    finally:
        server.close()


def _status(port: int, path: str, timeout: float = 5.0) -> int:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout).status_code


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """The server closed this connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for the idle sockets (both ends live in this process) whatever the shell's `ulimit -n`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * IDLE_SOCKETS + 1_024
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} leaves no room for {IDLE_SOCKETS} idle sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_files")
def test_readyz_answers_within_a_second_beside_2000_idle_sockets_on_one_thread() -> None:
    process = psutil.Process()
    with health_server(max_connections=256) as server:
        threads_before = process.num_threads()
        idle = []
        try:
            for _ in range(IDLE_SOCKETS):
                idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            time.sleep(0.5)  # let the server accept them all
            threads_with_idle = process.num_threads()
            started = time.monotonic()
            ready = _status(server.port, "/readyz", timeout=1.0)
            took = time.monotonic() - started
            dropped = sum(_closed_by_peer(sock, 0.01) for sock in idle[:IDLE_SOCKETS - 256])
            kept = sum(not _closed_by_peer(sock, 0.01) for sock in idle[-100:])
        finally:
            for sock in idle:
                sock.close()
    print(f"\n/readyz beside {IDLE_SOCKETS} idle sockets: {ready} in {took * 1000:.1f} ms; threads "
          f"{threads_before} -> {threads_with_idle}; oldest idle dropped {dropped} of {IDLE_SOCKETS - 256}, "
          f"newest 100 kept {kept}")
    assert ready == 200 and took < 1.0
    assert threads_with_idle <= threads_before + 1  # a thread per connection would be 2,000 more
    assert dropped == IDLE_SOCKETS - 256  # past the cap the oldest idle connections go, not the new probe
    assert kept == 100


def test_a_client_that_never_finishes_its_request_is_dropped_after_the_timeout() -> None:
    with health_server(request_timeout_s=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
            slow.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            started = time.monotonic()
            assert _closed_by_peer(slow, 5.0)
            assert 0.3 < time.monotonic() - started < 3.0
        assert _status(server.port, "/readyz") == 200


def test_garbage_and_oversized_requests_get_no_answer_and_the_server_goes_on() -> None:
    with health_server() as server:
        for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # a TLS hello
                     b"GET /readyz HTTP/1.1\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
                with contextlib.suppress(ConnectionError):
                    client.sendall(junk)
                assert _closed_by_peer(client, 5.0)
        assert _status(server.port, "/healthz") == 200


def test_the_answers_of_each_path() -> None:
    Metrics.get()  # registered once per process
    state = {"ready": False, "live": True}
    server = HealthServer("127.0.0.1", 0, lambda: state["ready"], is_live=lambda: state["live"]).start()
    try:
        assert (_status(server.port, "/healthz"), _status(server.port, "/readyz?verbose=1")) == (200, 503)
        state.update(ready=True, live=False)
        assert (_status(server.port, "/healthz"), _status(server.port, "/readyz")) == (503, 200)
        assert _status(server.port, "/nothing") == 404
        assert httpx.post(f"http://127.0.0.1:{server.port}/readyz", timeout=5).status_code == 405
        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert metrics.status_code == 200 and "mmsent_ready" in metrics.text
    finally:
        server.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=2)


def test_model_progress_counts_only_time_with_work_waiting() -> None:
    now = [100.0]
    progress = ModelProgress(clock=lambda: now[0])
    now[0] += 50
    assert progress.stalled_for() == 0.0 and progress.live(1.0)  # idle for 50 s: no stall
    progress.entered()
    now[0] += 2
    progress.entered()
    assert progress.stalled_for() == 2.0 and not progress.live(1.5)
    progress.left()  # one batch done: progress, the other still waits
    now[0] += 1
    assert progress.stalled_for() == 1.0
    progress.left()
    now[0] += 60
    assert progress.stalled_for() == 0.0 and progress.live(1.0)


# -- /healthz of a running consumer whose model stage hangs ------------------------------------------------


class HeldScorer:
    """The real tiny-random `Scorer`, except that a batch holding a post with `marker` in its text waits for
    `release` (as a hung kernel or a deadlock would) before it is scored."""

    def __init__(self, scorer: Any, marker: str) -> None:
        self._scorer = scorer
        self._marker = marker
        self.held = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    def score(self, posts: Sequence[Mapping[str, Any]]) -> list[Any]:
        if any(self._marker in str(p["text"]) for p in posts):
            self.held.set()
            self.release.wait(120)
        return list(self._scorer.score(posts))


@pytest.mark.kafka
def test_healthz_turns_503_while_the_model_stage_is_stuck_and_200_again_once_it_moves(
    kafka_bootstrap: str, unique_name: str
) -> None:
    from mmsent import Scorer

    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    settings = make_settings(settings_env(kafka_bootstrap, topics, None, liveness_stall_s=1))
    scorer = HeldScorer(Scorer.load("tiny-random"), marker="HOLD-THE-MODEL")
    with app_in_thread(settings, scorer=scorer, serve_http=True) as app:
        assert wait_until(lambda: app.health is not None and _status(app.health.port, "/readyz") == 200, 90)
        assert app.health is not None
        port = app.health.port
        idle_answers = []
        for _ in range(6):  # idle (nothing waits for the model) for three stall limits
            time.sleep(0.5)
            idle_answers.append(_status(port, "/healthz"))
        produce(kafka_bootstrap, topics.posts, synthetic_posts(20, lambda i: None))
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60)
        assert _status(port, "/healthz") == 200  # working and making progress

        produce(kafka_bootstrap, topics.posts, [post("stuck", "HOLD-THE-MODEL please")])
        assert scorer.held.wait(30)
        held_at = time.monotonic()
        assert wait_until(lambda: _status(port, "/healthz") == 503, 10, interval=0.1)
        turned_503_after = time.monotonic() - held_at
        assert _status(port, "/readyz") == 200  # still assigned: only liveness can restart it

        scorer.release.set()
        assert wait_until(lambda: _status(port, "/healthz") == 200, 10, interval=0.1)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60)
    print(f"\n/healthz idle over 3 s (stall limit 1 s): {idle_answers}; 503 {turned_503_after:.2f} s after the "
          f"model stage stuck; 200 again once released")
    assert idle_answers == [200] * 6
    assert 0.5 < turned_503_after < 5.0
    assert app.rc == 0  # type: ignore[attr-defined]
