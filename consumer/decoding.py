"""Decoding untrusted image bytes with bounded memory and bounded time, across the whole process.

    bytes ──open_checked (format, header: pixels and sides; a JPEG drafted to a DCT scale)──▶ w × h pixels to come
          ──PixelBudget.acquire(w × h): waits for room (more than the whole budget: too_large; no room in
            `room_wait_s`: busy)──▶ a daemon thread: decode_opened (pixels, EXIF, RGB, shrunk to within 2 × `min_side`)
          ──▶ the image, within `timeout_s` of the start of the decode
              └─ past it: ImageDecodeError("timeout"); the thread runs on and gives its pixels back when it ends

Why a budget and not a limit per image: 32 images of 16 MP decoded at once by one batch hold ~1.5 GB of pixels
(more while converting), past a pod's memory; with the budget a batch of huge images waits for room instead.
Why a thread that is abandoned rather than one that is stopped: Python cannot stop a thread, and a decode cannot be
interrupted; an abandoned decode keeps its pixels in the budget until it really ends, so memory stays bounded while
the image is already `unavailable`. The thread is a daemon so that a decode still running never delays an exit.

Every failure is counted here, once, in `mmsent_image_decode_failures_total` (reason: `timeout`, `busy`,
`too_large`, `corrupt`...), whether the bytes were fetched or came from the cache.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import Counter, Gauge

from mmsent import ImageDecodeError, decode_opened, open_checked

if TYPE_CHECKING:
    from PIL import Image

T = TypeVar("T")

DECODE_FAILURES = Counter(
    "mmsent_image_decode_failures_total", "Image bytes that could not be decoded safely.", ["reason"]
)
PIXELS_IN_FLIGHT = Gauge(
    "mmsent_image_decode_pixels_in_flight", "Decoded pixels held by decodes now: the pixel budget's use."
)

# The shorter side images are decoded to (at least, and below twice it) when the model's need is not known: twice the
# 256 px a cropping preset resizes to, a margin for a model that does not say. `decode_side` gives a model's own: its
# preprocess's `ImagePreprocess.source_side`, so that the model's own antialiased resize only ever shrinks
# (mmsent/imaging.py: what decoding that close costs in scores, and what it saves).
DECODE_MIN_SIDE = 512
# Waiting for room is bounded too: decodes that outlive their deadline keep their pixels, and a stream of hostile
# images must not stall the image stage behind them. Four deadlines: a batch of 32 images at the per-image limit
# goes through the default budget in 8 rounds of 4 decodes, each well under a second.
ROOM_WAIT_DEADLINES = 4


def decode_side(*scorers: object) -> int:
    """The `min_side` to decode images at for these scorers (a shadow model's beside the primary's): the largest
    `Scorer.decode_side` among them (its model's `ImagePreprocess.source_side`, the side the Scorer decodes image
    bytes at itself); DECODE_MIN_SIDE for a scorer that does not say (a test double) or says None."""
    return max((_decode_side(scorer) for scorer in scorers), default=DECODE_MIN_SIDE)


def _decode_side(scorer: object) -> int:
    side = getattr(scorer, "decode_side", None)
    return side if isinstance(side, int) else DECODE_MIN_SIDE


class PixelBudget:
    """Decoded pixels in flight across the process, at most `capacity`: `acquire` waits for room. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a capacity of at least 1, not {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._room = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._room:
            return self._in_use

    def acquire(self, pixels: int, timeout_s: float) -> bool:
        """Take `pixels` once there is room (False after `timeout_s` without). More than `capacity`: ValueError."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels exceed the whole budget of {self.capacity}")
        with self._room:
            if not self._room.wait_for(lambda: self._in_use + pixels <= self.capacity, timeout_s):
                return False
            self._in_use += pixels
            PIXELS_IN_FLIGHT.inc(pixels)
            return True

    def release(self, pixels: int) -> None:
        with self._room:
            self._in_use -= pixels
            PIXELS_IN_FLIGHT.dec(pixels)
            self._room.notify_all()


@functools.cache
def process_budget(capacity: int) -> PixelBudget:
    """The process-wide budget of that capacity: every decoder built from the same settings shares it."""
    return PixelBudget(capacity)


class BoundedDecoder:
    """`decoder(data) -> RGB image`, or `ImageDecodeError`: `mmsent`'s safe decoder under a pixel budget shared by
    the process and a deadline per decode. Called from worker threads (it blocks while it waits)."""

    def __init__(
        self,
        *,
        max_pixels: int,
        max_side: int,
        budget: PixelBudget,
        timeout_s: float,
        min_side: int | None = DECODE_MIN_SIDE,
    ) -> None:
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.budget = budget
        self.timeout_s = timeout_s
        self.min_side = min_side

    def __call__(self, data: bytes) -> Image.Image:
        return counted(self._decode, data)

    def _decode(self, data: bytes) -> Image.Image:
        im = open_checked(data, max_pixels=self.max_pixels, max_side=self.max_side, min_side=self.min_side)
        width, height = im.size  # after the draft: what the decode will allocate
        pixels = width * height
        try:
            room = self.budget.acquire(pixels, ROOM_WAIT_DEADLINES * self.timeout_s)
        except ValueError as exc:
            raise ImageDecodeError("too_large", str(exc)) from None
        if not room:
            raise ImageDecodeError("busy", f"no room for {pixels} pixels in {ROOM_WAIT_DEADLINES * self.timeout_s}s")
        decoding = _in_daemon_thread(lambda: decode_opened(im, min_side=self.min_side),
                                     lambda: self.budget.release(pixels))
        try:
            return decoding.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise ImageDecodeError("timeout", f"{width}x{height} not decoded in {self.timeout_s}s") from None


def counted(decode: Callable[[bytes], T], data: bytes) -> T:
    """`decode(data)`, its `ImageDecodeError` counted by reason (and raised again)."""
    try:
        return decode(data)
    except ImageDecodeError as exc:
        DECODE_FAILURES.labels(exc.reason).inc()
        raise


def _in_daemon_thread(work: Callable[[], T], finally_: Callable[[], None]) -> concurrent.futures.Future[T]:
    """`work()` on a new daemon thread; `finally_()` when it really ends, whether anyone still waits or not."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to the waiter, if any is left
            future.set_exception(exc)
        finally:
            finally_()

    threading.Thread(target=run, name="mmsent-decode", daemon=True).start()
    return future
