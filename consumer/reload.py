"""Model rollout without leaving the group: a new model is loaded and warmed beside the serving one, off the poll
loop, and the loop swaps it in between batches (a batch keeps the model it was submitted with).

    SIGHUP ──────────────────────┐
    the MMSENT_MODEL directory   ├──▶ ModelReloader thread: load + vet + warm ──▶ take() ──▶ Application swaps it in
    changed (a symlink flipped)  ┘                 │ raised
                                                   └──▶ refused: a log line, mmsent_model_reloads_total{outcome=
                                                        "refused"}; the serving model goes on

Nothing a model directory holds ends the thread: `fingerprint` never raises (a dangling link, a file that vanishes
between listing and stat, a directory it may not read are part of the fingerprint, so their repair is a change
too), and a round that raises anyway is logged (`model_watch_failed`), counted, and the watch goes on; SIGHUP
still reloads after it.
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

# (name relative to the directory, size, mtime in ns) per file; size and mtime -1 for a file that cannot be stat'ed
FileStamp = tuple[str, int, int]
Fingerprint = tuple[str, tuple[FileStamp, ...]] | None
UNREADABLE = -1


def fingerprint(directory: Path | None) -> Fingerprint:
    """What a change of the model directory changes: where it resolves to (a flipped symlink, as a Kubernetes
    volume update does) and the name, size and modification time of every file under it. None: no directory (or a
    dangling link to one). Never raises: whatever cannot be read is recorded as unreadable."""
    if directory is None:
        return None
    try:
        if not directory.is_dir():
            return None
        real = os.path.realpath(directory)
    except OSError:  # e.g. a parent it may not search: no directory it could load from either
        return None
    files: list[FileStamp] = []

    def unreadable(error: OSError) -> None:  # a subdirectory os.walk cannot list
        files.append((os.path.relpath(error.filename or real, real), UNREADABLE, UNREADABLE))

    for root, _dirs, names in os.walk(real, onerror=unreadable):
        files.extend(_stamp(real, os.path.join(root, name)) for name in names)
    return real, tuple(sorted(files))


def _stamp(real: str, path: str) -> FileStamp:
    """A file's stamp; unreadable when it is a dangling link, vanished since it was listed, or may not be stat'ed."""
    name = os.path.relpath(path, real)
    try:
        stat = os.stat(path)
    except OSError:
        return name, UNREADABLE, UNREADABLE
    return name, stat.st_size, stat.st_mtime_ns


class ModelReloader(Generic[T]):
    """Runs `load` on its own thread when asked (`request`, e.g. on SIGHUP) or when `watched` changes (checked every
    `interval_s`; 0: only when asked). The loop collects the result with `take`; a load that raises is reported to
    `on_refused` and nothing is handed over. A round that raises all the same (its fingerprint, `on_refused`) is
    logged, counted in `failures` and reported to `on_failed`, and the thread goes on."""

    def __init__(self, load: Callable[[], T], on_refused: Callable[[BaseException], None], *,
                 watched: Path | None = None, interval_s: float = 0.0,
                 on_failed: Callable[[BaseException], None] | None = None) -> None:
        self._load = load
        self._on_refused = on_refused
        self._on_failed = on_failed
        self._watched = watched
        self._interval_s = interval_s
        self._seen = fingerprint(watched)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._ready: T | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mmsent-model-reload", daemon=True)
        self.failures = 0  # rounds that raised (see `_run`)

    def start(self) -> ModelReloader[T]:
        self._thread.start()
        return self

    @property
    def watching(self) -> bool:
        """Whether the thread runs (until `close`)."""
        return self._thread.is_alive()

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
            try:
                self._round(requested)
            except Exception as exc:  # nothing may end the watch: the next change or SIGHUP must still reload
                self._failed(exc)

    def _round(self, requested: bool) -> None:
        seen = fingerprint(self._watched) if self._interval_s else self._seen
        if requested or seen != self._seen:
            self._seen = seen
            self._reload("signal" if requested else "directory_changed")

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        log.error("model_watch_failed", error=repr(exc)[:500], failures=self.failures)
        if self._on_failed is not None:
            try:
                self._on_failed(exc)
            except Exception as again:  # a broken reporter is logged, not allowed to end the thread
                log.error("model_watch_failed", error=repr(again)[:500], failures=self.failures)

    def _reload(self, reason: str) -> None:
        log.info("model_reload_started", reason=reason)
        try:
            loaded = self._load()
        except Exception as exc:  # whatever a model directory can make a loader raise: the serving model stays
            self._on_refused(exc)
            return
        with self._lock:
            self._ready = loaded
