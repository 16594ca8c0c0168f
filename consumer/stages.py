"""The two work stages and the pipeline that overlaps them.

* `ImageStage` (async, on the I/O loop thread): for the distinct image URLs of a batch, the fetch policy first
  (a URL it refuses is `blocked`, and the cache is never read for it), then the embedding cache (a hit skips the
  download and the CNN), then the bytes cache (a hit skips the download), then the safe fetcher; bytes are
  decoded off the loop, within the process's pixel budget and the decode deadline (consumer/decoding.py).
* `ModelStage` (the model worker thread): the image encoder for images without a cached embedding (stored back
  in the cache), then the scorer on the batch, sorted by text length. A batch that raises is split in halves
  until the poison post is alone; that post gets the error policy's decision (a `model_error` dead letter).
* `Pipeline`: batch N+1's images are fetched on the loop while batch N is on the model (under a backlog, two
  full batches on the model at once keep the scorer's workers busy); results come back in submission order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import structlog

from consumer.batcher import Batch, ServingModel, WorkItem
from consumer.errors import Action, ErrorPolicy, FatalError, InvalidScores
from consumer.liveness import ModelProgress
from consumer.metrics import Metrics
from consumer.protocols import CacheLike, FetcherLike, ScoreResultLike, ScorerLike, is_embedding
from consumer.shadow import ShadowStage
from consumer.tracing import Tracing
from schemas.models import ImageStatus, Scores

log = structlog.get_logger(__name__)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop on its own daemon thread, for the fetcher and the cache."""

    def __init__(self, name: str = "mmsent-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


class ImageStage:
    def __init__(
        self,
        fetcher: FetcherLike,
        cache: CacheLike | None,
        decode: Callable[[bytes], Any],
        metrics: Metrics,
        *,
        read_embeddings: bool = True,
        tracing: Tracing | None = None,
    ) -> None:
        """`read_embeddings=False`: every image is had as pixels (a shadow model with another image encoder)."""
        self._fetcher = fetcher
        self._cache = cache
        self._decode = decode
        self._metrics = metrics
        self._read_embeddings = read_embeddings
        self._tracing = tracing or Tracing()

    async def prepare(self, batch: Batch, encoder_id: str) -> Batch:
        """The batch's images, as the model with image encoder `encoder_id` takes them."""
        started = time.monotonic()
        by_url: dict[str, list[WorkItem]] = {}
        for item in batch.items:
            if item.error is None and item.post is not None and item.post.image_url:
                by_url.setdefault(item.post.image_url, []).append(item)
        if by_url:
            with self._tracing.stage(batch.trace, "fetch"):
                found = await self._resolve(list(by_url), encoder_id)
            for url, items in by_url.items():
                status, image, size = found[url]
                for item in items:
                    item.image_status, item.image, item.image_url_key, item.image_bytes = status, image, url, size
        batch.timings["fetch"] = time.monotonic() - started
        return batch

    async def _resolve(self, urls: list[str], encoder_id: str) -> dict[str, tuple[ImageStatus, Any, int]]:
        """Per URL: the status, the image (an embedding or a decoded image, or None) and its size in bytes."""
        found: dict[str, tuple[ImageStatus, Any, int]] = {}
        # The policy before the cache: an entry must never smuggle in an image the fetcher would refuse to fetch.
        # A refused URL goes to the fetcher, which answers `blocked` without any I/O (and counts and logs it).
        cacheable = [url for url in urls if self._fetcher.refuses(url) is None]
        embeddings = await self._cache_call(self._cache.get_embeddings(cacheable, encoder_id)) if (
            self._cache and cacheable and self._read_embeddings) else {}
        for url, embedding in (embeddings or {}).items():
            found[url] = (ImageStatus.OK, embedding, 0)
            self._metrics.image_source.labels("embedding_cache").inc()
        missing = [url for url in cacheable if url not in found]
        cached_bytes = await self._cache_call(self._cache.get_images(missing)) if (self._cache and missing) else {}
        decodes: dict[str, tuple[Awaitable[Any], int]] = {}
        for url, data in (cached_bytes or {}).items():
            self._metrics.image_source.labels("bytes_cache").inc()
            decodes[url] = (asyncio.ensure_future(asyncio.to_thread(self._safe_decode, data)), len(data))
        to_fetch = [url for url in urls if url not in found and url not in decodes]
        fetched = await asyncio.gather(*(self._fetch(url) for url in to_fetch))
        fresh_bytes: dict[str, bytes] = {}
        for url, (status, image, body) in zip(to_fetch, fetched, strict=True):
            found[url] = (status, image, len(body) if body else 0)
            if body is not None and image is not None:
                fresh_bytes[url] = body
        for url, (awaitable, size) in decodes.items():
            image = await awaitable
            found[url] = (ImageStatus.OK, image, size) if image is not None else (ImageStatus.UNAVAILABLE, None, 0)
        if fresh_bytes and self._cache is not None:
            await self._cache_call(self._cache.put_images(fresh_bytes))
        return found

    async def _fetch(self, url: str) -> tuple[ImageStatus, Any, bytes | None]:
        self._metrics.image_source.labels("fetch").inc()
        try:
            result, image = await self._fetcher.fetch_image(url)
        except Exception as exc:  # the fetcher promises not to raise; a bug there must not stop the stream
            log.warning("image_fetch_raised", url=url[:200], error=repr(exc))
            return ImageStatus.UNAVAILABLE, None, None
        if result.status == "blocked":
            return ImageStatus.BLOCKED, None, None
        if result.status != "ok" or image is None:
            return ImageStatus.UNAVAILABLE, None, None
        return ImageStatus.OK, image, result.data

    def _safe_decode(self, data: bytes) -> Any:
        try:
            return self._decode(data)
        except Exception as exc:
            log.info("cached_image_undecodable", error=repr(exc))
            return None

    async def _cache_call(self, awaitable: Awaitable[T]) -> T | None:
        try:
            return await awaitable
        except Exception as exc:  # the cache degrades to misses by itself; this is belt and braces
            log.warning("cache_call_failed", error=repr(exc))
            return None


class ModelStage:
    def __init__(
        self,
        scorer: ScorerLike,
        cache: CacheLike | None,
        io: LoopThread | None,
        policy: ErrorPolicy,
        metrics: Metrics,
        recent_embeddings: int = 2048,
        shadow: ShadowStage | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._scorer = scorer
        self._shadow = shadow
        self._tracing = tracing or Tracing()
        self._cache = cache
        self._io = io
        self._policy = policy
        self._metrics = metrics
        self._recent = RecentEmbeddings(recent_embeddings)

    def run(self, batch: Batch) -> Batch:
        started = time.monotonic()
        if self._shadow is not None:
            self._shadow.keep_pixels(batch.items)
        with self._tracing.stage(batch.trace, "embed"):
            self._embed(batch.items)
        live = [item for item in batch.items if item.error is None and item.post is not None]
        if live:
            with self._tracing.stage(batch.trace, "score"):
                self._score(live)
        batch.timings["model"] = time.monotonic() - started
        if live and self._shadow is not None:
            self._shadow.run(live)
        return batch

    def _embed(self, items: Sequence[WorkItem]) -> None:
        images: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for item in items:
            if item.image_status is ImageStatus.OK and item.image_url_key and not is_embedding(item.image):
                images.setdefault(item.image_url_key, item.image)
                sizes[item.image_url_key] = item.image_bytes
        if not images:
            return
        embeddings, computing, urls = self._recent.claim(list(images))
        if embeddings or computing:
            self._metrics.image_source.labels("recent_embedding").inc(len(embeddings) + len(computing))
        fresh: dict[str, Any] = {}
        try:
            fresh = self._embed_many(urls, [images[url] for url in urls]) if urls else {}
        finally:
            self._recent.settle(urls, fresh)  # also on an error: no other batch may wait for these forever
        self._metrics.cnn_images.inc(len(urls))
        embeddings.update(fresh)
        embeddings.update((url, future.result()) for url, future in computing.items())
        stored = {url: emb for url, emb in fresh.items() if emb is not None}
        if stored and self._cache is not None and self._io is not None:
            future = self._io.submit(_quiet(self._cache.put_embeddings(stored, self._scorer.image_encoder_id, sizes)))
            future.add_done_callback(lambda _f: None)
        for item in items:
            if item.image_url_key in embeddings:
                embedding = embeddings[item.image_url_key]
                if embedding is None:
                    item.image, item.image_status = None, ImageStatus.UNAVAILABLE
                else:
                    item.image = embedding

    def _embed_many(self, urls: list[str], images: list[Any]) -> dict[str, Any]:
        try:
            return dict(zip(urls, self._scorer.embed_images(images), strict=True))
        except Exception as exc:
            if len(urls) == 1:
                log.warning("image_embedding_failed", url=urls[0][:200], error=repr(exc))
                return {urls[0]: None}
            middle = len(urls) // 2
            return self._embed_many(urls[:middle], images[:middle]) | self._embed_many(urls[middle:], images[middle:])

    @staticmethod
    def _check_scores(result: ScoreResultLike) -> None:
        """Raise `InvalidScores` unless the result's scores (and each modality's) are probabilities that sum to 1:
        the rule of the event's `Scores`, checked here, where bisection can still find the post."""
        by_modality = dict(getattr(result, "scores_by_modality", None) or {})
        for name, scores in [("scores", result.scores), *by_modality.items()]:
            try:
                Scores(**{label: float(p) for label, p in dict(scores).items()})
            except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                raise InvalidScores(f"{name}: {dict(scores)!r:.300}: {str(exc)[:300]}") from None

    def _score(self, items: list[WorkItem]) -> None:
        posts = [{"text": item.post.text if item.post else "", "image": item.image} for item in items]
        try:
            results = self._scorer.score(posts)
            if len(results) != len(items):
                raise RuntimeError(f"the scorer returned {len(results)} results for {len(items)} posts")
            for result in results:
                self._check_scores(result)  # inside the bisection: the post that gives NaN is the one dead-lettered
        except Exception as exc:
            if len(items) == 1:
                item = items[0]
                decision = self._policy.on_model_error(exc, item)
                log.error("poison_post", error=repr(exc)[:500], action=decision.action, **item.log_fields())
                if decision.action is Action.FATAL:
                    raise FatalError(f"the model failed on a post: {exc!r}") from exc
                item.error = decision
                return
            self._metrics.model_splits.inc()
            middle = len(items) // 2
            self._score(items[:middle])
            self._score(items[middle:])
            return
        for item, result in zip(items, results, strict=True):
            item.result = result
            if item.image_status is ImageStatus.OK and not getattr(result, "image_used", True):
                item.image_status = ImageStatus.UNAVAILABLE


async def _quiet(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as exc:
        log.warning("cache_store_failed", error=repr(exc))


class RecentEmbeddings:
    """The latest image embeddings in this process, and those being computed right now.

    The batches after one batch had their cache lookups done before its embeddings were stored, and two batches
    may be on the model at once: this memory spares them the CNN for an image that one of them has just embedded
    or is embedding. Thread-safe. Claims are atomic, so a batch only ever waits for batches that claimed before it.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._done: OrderedDict[str, Any] = OrderedDict()
        self._computing: dict[str, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()

    def claim(self, urls: list[str]) -> tuple[dict[str, Any], dict[str, concurrent.futures.Future[Any]], list[str]]:
        """-> (embeddings known, embeddings another batch is computing, the URLs this caller must embed)."""
        known: dict[str, Any] = {}
        computing: dict[str, concurrent.futures.Future[Any]] = {}
        mine: list[str] = []
        with self._lock:
            for url in urls:
                if url in self._done:
                    self._done.move_to_end(url)
                    known[url] = self._done[url]
                elif url in self._computing:
                    computing[url] = self._computing[url]
                else:
                    self._computing[url] = concurrent.futures.Future()
                    mine.append(url)
        return known, computing, mine

    def settle(self, urls: list[str], embeddings: Mapping[str, Any]) -> None:
        """The claimed `urls` are done: their embedding, or None for those missing from `embeddings` (failed)."""
        with self._lock:
            for url in urls:
                embedding = embeddings.get(url)
                self._computing.pop(url).set_result(embedding)
                if embedding is not None:
                    self._done[url] = embedding
            while len(self._done) > self._size:
                self._done.popitem(last=False)


class Pipeline:
    """Batches go in; the same batches come out, completed or failed, in the order they went in."""

    def __init__(self, io: LoopThread, image_stage: ImageStage, *, model_concurrency: int = 1) -> None:
        self._io = io
        self._image_stage = image_stage
        self._model_threads = [SerialWorker(f"mmsent-model-{k}") for k in range(max(1, model_concurrency))]
        self._turn = 0
        self._pending: deque[tuple[Batch, concurrent.futures.Future[Batch]]] = deque()
        self.progress = ModelProgress()  # what /healthz reads: a stuck model thread is a dead pod

    @property
    def pending(self) -> int:
        return len(self._pending)

    def room(self, *, full: bool) -> int:
        """How many more batches may be submitted now: up to one on each model thread for full batches (a backlog),
        one on the model for smaller ones; and one more having its images fetched.

        While the model is busy, due records wait in the batcher and join the next, bigger batch rather than
        queueing as many small ones, so the queue ahead of the model stays bounded. Measured on the dev VM with one
        model thread (900 posts at full load, then 750 at 26/s, alternating): full load 52.1 and 53.9 posts/s
        unbounded, 55.1 and 55.3 with this limit; half-load p99 the same either way (192-336 ms)."""
        on_model = len(self._model_threads) if full else 1
        return on_model + 1 - len(self._pending)

    def submit(self, batch: Batch, model: ServingModel) -> None:
        """`model` scores the batch, which keeps it (`batch.model`): a model swapped in meanwhile never mixes in."""
        batch.model = model
        prepared = self._io.submit(self._image_stage.prepare(batch, model.scorer.image_encoder_id))
        # Each model thread keeps its batches in order. A full batch (there is a backlog) goes to the next thread,
        # to share the model with the batch before it; a smaller one follows the last batch on its thread, so that
        # below capacity a batch waits for no other batch's slices.
        if batch.full:
            self._turn = (self._turn + 1) % len(self._model_threads)
        self.progress.entered()
        scored = self._model_threads[self._turn].submit(self._model_step, model, prepared)
        scored.add_done_callback(lambda _scored: self.progress.left())
        self._pending.append((batch, scored))

    def on_model_threads(self, fn: Callable[[], Any]) -> None:
        """`fn()` on each model thread in turn, after the batches already queued there; returns when all are done
        (raising what one raised). One at a time: a warm-up may patch process-wide compiler settings."""
        for model_thread in self._model_threads:
            model_thread.submit(fn).result()

    @staticmethod
    def _model_step(model: ServingModel, prepared: concurrent.futures.Future[Batch]) -> Batch:
        return model.stage.run(prepared.result())

    def wait_head(self, timeout: float) -> None:
        if self._pending:
            concurrent.futures.wait([self._pending[0][1]], timeout=timeout)

    def completed(self) -> list[tuple[Batch, BaseException | None]]:
        out: list[tuple[Batch, BaseException | None]] = []
        while self._pending and self._pending[0][1].done():
            batch, future = self._pending.popleft()
            out.append((batch, future.exception()))
        return out

    def close(self) -> None:
        for model_thread in self._model_threads:
            model_thread.close()
        self._pending.clear()


_Task = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]


class SerialWorker:
    """One daemon thread running submitted calls in order. Daemon: a model stuck past the shutdown grace
    period must not keep the process from exiting (a ThreadPoolExecutor's workers are joined at exit)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, args, future))
        return future

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            fn, args, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def close(self) -> None:
        """Cancel what has not started; the running call (if any) finishes on its own."""
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[2].cancel()
        self._queue.put(None)
