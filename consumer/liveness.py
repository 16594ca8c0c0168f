"""Whether the model stage is making progress: what `/healthz` answers.

    Pipeline.submit ───▶ entered() ──┐
                                     ├──▶ ModelProgress.stalled_for() ──▶ HealthServer: /healthz 503 once it
    a model step ends ─▶ left() ─────┘                                     reaches MMSENT_LIVENESS_STALL_S

A hung model thread (a deadlocked kernel, a scorer waiting on something that never comes) keeps the process alive
and its partitions assigned while nothing moves; only a liveness probe that sees it gets the pod restarted. Idle
(nothing waiting for the model) is never a stall, however long it lasts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ModelProgress:
    """Batches waiting for (or on) the model, and when the model last made progress. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting = 0
        self._last_progress = clock()

    def entered(self) -> None:
        """A batch now waits for the model. The first after an idle spell starts the clock: idle time is no stall."""
        with self._lock:
            if self._waiting == 0:
                self._last_progress = self._clock()
            self._waiting += 1

    def left(self) -> None:
        """A batch's model step ended (scored, failed or cancelled): progress."""
        with self._lock:
            self._waiting = max(0, self._waiting - 1)
            self._last_progress = self._clock()

    def stalled_for(self) -> float:
        """Seconds without progress while work waits; 0.0 when nothing waits."""
        with self._lock:
            return 0.0 if self._waiting == 0 else max(0.0, self._clock() - self._last_progress)

    def live(self, stall_s: float) -> bool:
        return self.stalled_for() < stall_s
