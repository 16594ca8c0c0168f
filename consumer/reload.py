"""Model rollout without leaving the group: a new model is loaded and warmed beside the serving one, off the poll
loop, and the loop swaps it in between batches (a batch keeps the model it was submitted with).

    SIGHUP ──────────────────────┐
    the MMSENT_MODEL directory   ├──▶ ModelReloader thread: load + warm ──▶ take() ──▶ Application swaps it in
    changed (a symlink flipped)  ┘                 │ raised
                                                   └──▶ refused: a log line, mmsent_model_reloads_total{outcome=
                                                        "refused"}; the serving model goes on
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("consumer")
T = TypeVar("T")

Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]] | None


def fingerprint(directory: Path | None) -> Fingerprint:
    """What a change of the model directory changes: where it resolves to (a flipped symlink, as a Kubernetes
    volume update does) and the name, size and modification time of every file under it. None: no directory."""
    if directory is None or not directory.is_dir():
        return None
    real = os.path.realpath(directory)
    files = []
    for root, _dirs, names in os.walk(real):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            files.append((os.path.relpath(os.path.join(root, name), real), stat.st_size, stat.st_mtime_ns))
    return real, tuple(sorted(files))


class ModelReloader(Generic[T]):
    """Runs `load` on its own thread when asked (`request`, e.g. on SIGHUP) or when `watched` changes (checked every
    `interval_s`; 0: only when asked). The loop collects the result with `take`; a load that raises is reported to
    `on_refused` and nothing is handed over."""

    def __init__(self, load: Callable[[], T], on_refused: Callable[[BaseException], None], *,
                 watched: Path | None = None, interval_s: float = 0.0) -> None:
        self._load = load
        self._on_refused = on_refused
        self._watched = watched
        self._interval_s = interval_s
        self._seen = fingerprint(watched)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._ready: T | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mmsent-model-reload", daemon=True)

    def start(self) -> ModelReloader[T]:
        self._thread.start()
        return self

    def request(self) -> None:
        """Load again now (safe from a signal handler: it only sets an event)."""
        self._wake.set()

    def take(self) -> T | None:
        """The newly loaded model, once; None when there is none."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval_s or None)
            requested = self._wake.is_set()
            self._wake.clear()
            if self._stopping.is_set():
                return
            seen = fingerprint(self._watched) if self._interval_s else self._seen
            if requested or seen != self._seen:
                self._seen = seen
                self._reload("signal" if requested else "directory_changed")

    def _reload(self, reason: str) -> None:
        log.info("model_reload_started", reason=reason)
        try:
            loaded = self._load()
        except Exception as exc:  # whatever a model directory can make a loader raise: the serving model stays
            self._on_refused(exc)
            return
        with self._lock:
            self._ready = loaded
