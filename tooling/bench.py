"""`mmsent bench`: model-only figures, end to end through the real broker/Redis/image server, and the naive
seed-style consumer in the same run, so that the ratios are measured side by side; each of the first two with the
CPU encoders in fp32 and in int8 (MMSENT_CPU_PRECISION), against the aims of issue 28.

    mmsent bench all --write BENCHMARKS.md     # ~10 minutes on a 2-core machine
    mmsent bench smoke                         # a minute: proves every part runs (used by the test suite)
    mmsent bench models default@fp32 default@int8 ../v2.2@fp32    # model only, alternating rounds
    mmsent bench precision --preset seed       # fp32, bf16 and int8 of the big preset (mmsent/benchmarks/precision)

mmsent, torch and what imports them (consumer.app, tooling.shadowbench) are imported inside the functions that use
them: tooling.cli loads this module for every tool command, and `mmsent reconcile` or `mmsent demo --help` must
not wait seconds for torch.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from confluent_kafka import Consumer, Producer
from prometheus_client.parser import text_string_to_metric_families

from tooling.embedded import BROKERS, EmbeddedServices, create_topics, free_port
from tooling.localimages import LoopbackImageServer
from tooling.topicreader import read_topic

bench_app = typer.Typer(help="Benchmarks (`mmsent bench all --write BENCHMARKS.md`).", no_args_is_help=True)

IN, OUT, DLQ = "bench-posts", "bench-sentiment", "bench-dlq"


# -- the image server and the posts -------------------------------------------------------------------------------


def photo_server(photos: list[bytes]) -> LoopbackImageServer:
    return LoopbackImageServer({f"/p{i}.jpg": (photo, "image/jpeg") for i, photo in enumerate(photos)})


def photo_url(server: LoopbackImageServer, index: int, run: str) -> str:
    # The run's name makes each run's URLs new to the cache; the photo bytes are shared.
    return f"{server.base}/p{index}.jpg?run={run}"


def make_posts(count: int, n_photos: int, server: LoopbackImageServer, repeat_share: float, seed: int,
               tag: str = "") -> list[bytes]:
    """Tweet-like captions; each post has an image, `repeat_share` of them an image seen earlier in the stream.
    The same `seed` gives the same captions and the same sequence of photos; `tag` makes the post ids and image
    URLs new (a second consumer run on the same broker and Redis then finds nothing of the first's)."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent.benchmarks.host import synthetic_captions

    rng = random.Random(seed)
    captions = synthetic_captions(count, seed)
    posts, fresh = [], 0
    for index, caption in enumerate(captions):
        if fresh and rng.random() < repeat_share:
            photo = rng.randrange(fresh)
        else:
            photo, fresh = fresh % n_photos, fresh + 1
        url = photo_url(server, photo, f"{seed}{tag}")
        posts.append(json.dumps({"post_id": f"b{seed}{tag}-{index}", "text": caption, "image_url": url,
                                 "created_at": datetime.now(UTC).isoformat()}).encode())
    return posts


# -- end to end -------------------------------------------------------------------------------------------------


IRQ_STEAL = "interrupts, steal"  # CPU time charged to no process: the kernel's interrupt work, the hypervisor's


class CpuMeter:
    """Where the machine's cores went over a window: each role's CPU time as a share of all cores' time, the share
    no process was charged (interrupts, and the hypervisor's steal on a VM), the share that idled, and "other": the
    rest of the machine's busy time. A process counts for a role when it or its parent has that role's pid.

    "other" is the busy remainder, not a sum over the processes left: the machine's counters (/proc/stat) see every
    process, a process list only those still alive at the end and, in a container, those of its own PID namespace
    (in one CI run the listed processes fell 22% of the machine's time short of /proc/stat's busy time)."""

    def __init__(self, roles: dict[str, int | None]) -> None:
        self._role_of = {pid: role for role, pid in roles.items() if pid}
        self._roles = list(roles)
        self._start: tuple[dict[int, tuple[int, float]], Any] | None = None
        self._end: tuple[dict[int, tuple[int, float]], Any] | None = None

    @staticmethod
    def _snapshot() -> tuple[dict[int, tuple[int, float]], Any]:
        """Per process: (parent pid, CPU seconds); and the machine's CPU times."""
        import psutil  # the `tools` extra: `mmsent bench` says when it is missing (tooling.cli)

        processes = {}
        for process in psutil.process_iter(["ppid", "cpu_times"]):
            times = process.info["cpu_times"]
            if times is not None:  # None: not ours to read, or gone meanwhile
                processes[process.pid] = (process.info["ppid"], times.user + times.system)
        return processes, psutil.cpu_times()

    def __enter__(self) -> CpuMeter:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = self._snapshot()

    def shares(self) -> dict[str, float] | None:
        """None unless every role's process was read at both ends: a share of 0 then means the kernel charged it no
        clock tick over the window (a short window, a process that mostly waits), never a process not found."""
        if self._start is None or self._end is None:
            return None
        (before, machine0), (after, machine1) = self._start, self._end
        # Linux counts a guest's time in user (and nice) already: summing every field would count it twice
        counted = [field for field in machine1._fields if not field.startswith("guest")]
        total = sum(getattr(machine1, f) - getattr(machine0, f) for f in counted)
        if total <= 0 or any(pid not in before or pid not in after for pid in self._role_of):
            return None
        seconds = dict.fromkeys(self._roles, 0.0)
        for pid, (parent, used) in after.items():
            role = self._role_of.get(pid) or self._role_of.get(parent)
            if role:
                seconds[role] += used - before.get(pid, (parent, 0.0))[1]

        def share(*fields: str) -> float:
            return sum(getattr(machine1, f) - getattr(machine0, f) for f in fields) / total

        roles = {role: t / total for role, t in seconds.items()}
        unowned, idle = share("irq", "softirq", "steal"), share("idle", "iowait")
        # may dip a point or two below 0: the processes' counters and the machine's are kept, and rounded, apart
        other = 1 - unowned - idle - sum(roles.values())
        return roles | {"other": other, IRQ_STEAL: unowned, "idle": idle}


@dataclass
class EndToEnd:
    load: str
    posts: int
    offered_per_s: float | None
    posts_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    image_requests: int
    cpu_shares: dict[str, float] | None  # of all cores' time, from the first post produced to the last event


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def consumer_process(env: dict[str, str], metrics_port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`mmsent consume` as its own process, as it is deployed; yields once it reports ready."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MMSENT_")} | env
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "consumer", "consume"], env=full_env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the consumer did not become ready; see {log_path}")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


class EventCounter:
    """Counts the consumer's acknowledged events from its /metrics, and reads them from the output topic afterwards.

    No Kafka client is attached while the consumer runs: on the embedded broker every attached consumer costs
    ~0.4 of a core even when idle (measured 2026-11-28), which would be taken from the system under test.
    Latency = the event's timestamp (set when the consumer produced it) - the post's (set by the bench producer).
    """

    def __init__(self, bootstrap: str, metrics_port: int) -> None:
        self._bootstrap = bootstrap
        self._metrics_port = metrics_port
        self.sent_ms: dict[str, float] = {}

    def _samples(self) -> list[Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self._metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def events(self) -> int:
        return int(sum(s.value for s in self._samples() if s.name == "mmsent_events_produced_total"))

    def stage_totals(self) -> dict[str, float]:
        """The consumer's running totals so far: batches and their posts, and seconds per timed stage (wait: the
        oldest post's wait for its batch's cut; fetch: cache, download and CPU decode of the batch's images, on the
        I/O loop; model: CNN and scoring, on a model thread)."""
        totals = dict.fromkeys(["batches", "posts", "wait", "fetch", "model"], 0.0)
        for s in self._samples():
            if s.name == "mmsent_batch_size_count":
                totals["batches"] += s.value
            elif s.name == "mmsent_batch_size_sum":
                totals["posts"] += s.value
            elif s.name == "mmsent_stage_latency_seconds_sum" and s.labels.get("stage") in totals:
                totals[s.labels["stage"]] += s.value
        return totals

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events() >= count:
                return True
            time.sleep(0.25)
        return False

    def latencies_ms(self, ids: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Per post: produce -> event latency, and the event's time (ms since the epoch)."""
        wanted = set(ids)
        latency, done_at = {}, {}
        for record in read_topic({"bootstrap.servers": self._bootstrap}, OUT, timeout_s=120):
            post_id = json.loads(record.value or b"{}").get("post_id")
            if post_id in wanted and post_id not in latency:
                latency[post_id] = record.timestamp_ms - self.sent_ms[post_id]
                done_at[post_id] = float(record.timestamp_ms)
        return latency, done_at


def post_producer(bootstrap: str) -> Any:
    """The bench's one producer, made once per run and warmed by the warm-up posts: a fresh idempotent producer
    holds its first posts while it connects and gets its producer id, which would count as the consumer's latency
    (the first 50 posts of a half-load run measured 0.8 s on average, the rest 0.13 s; 2026-11-28)."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "enable.idempotence": True})


def _produce(producer: Any, posts: list[bytes], counter: EventCounter, rate_per_s: float | None) -> float:
    started = time.time()
    for index, value in enumerate(posts):
        if rate_per_s:
            delay = started + index / rate_per_s - time.time()
            if delay > 0:
                time.sleep(delay)
        post_id = json.loads(value)["post_id"]
        counter.sent_ms[post_id] = time.time() * 1000
        producer.produce(IN, value=value, timestamp=int(counter.sent_ms[post_id]))
        producer.poll(0)
    producer.flush(60)
    return started


def run_end_to_end(posts: list[bytes], producer: Any, counter: EventCounter, server: LoopbackImageServer,
                   load: str, rate_per_s: float | None, roles: dict[str, int | None], timeout_s: float = 600
                   ) -> EndToEnd:
    ids = [json.loads(p)["post_id"] for p in posts]
    requests_before = server.requests
    expected = counter.events() + len(ids)
    with CpuMeter(roles) as cpu:
        started = _produce(producer, posts, counter, rate_per_s)
        if not counter.wait_for(expected, timeout_s=timeout_s):
            raise RuntimeError(f"only {counter.events() - expected + len(ids)} of {len(ids)} posts were scored")
    latency, done_at = counter.latencies_ms(ids)
    if len(latency) != len(ids):
        raise RuntimeError(f"{len(ids) - len(latency)} of {len(ids)} events were not found in {OUT}")
    elapsed_s = (max(done_at.values()) - started * 1000) / 1000
    values = list(latency.values())
    return EndToEnd(load, len(ids), rate_per_s, len(ids) / elapsed_s, _percentile(values, 0.50),
                    _percentile(values, 0.95), _percentile(values, 0.99), server.requests - requests_before,
                    cpu.shares())


@dataclass
class ServedRun:
    full: EndToEnd  # a backlog: every post produced at once
    half: EndToEnd | None  # posts offered steadily at half the full run's rate (None: not asked for)
    stages: dict[str, float]  # the consumer's own totals over the full run (EventCounter.stage_totals)
    log_path: Path  # the consumer's log

    def half_load(self) -> EndToEnd:
        """The half-load run; an error where none was asked for (`half_posts` 0)."""
        if self.half is None:
            raise RuntimeError("this end-to-end run had no half-load run")
        return self.half


def serve_end_to_end(services: EmbeddedServices, server: LoopbackImageServer, n_photos: int, *, model: str | None,
                     batch_size: int, max_wait_ms: int, full_posts: int, half_posts: int, partitions: int = 3,
                     env: dict[str, str] | None = None, log_dir: Path | None = None, timeout_s: float = 600,
                     tag: str = "") -> ServedRun:
    """`mmsent consume` as its own process on `services` (the broker and a Redis), images from `server`, 30% of
    posts repeating an earlier image: a warm-up of two batches, a backlog of `full_posts`, then `half_posts` offered
    at half its rate (none when 0). `env`: more MMSENT_* settings for the consumer (MMSENT_DEVICE, ...); its log goes to
    `log_dir`/consumer.log (default: a new temporary folder, kept); each run fails after `timeout_s`. `tag`: a run's
    own post ids and image URLs (`make_posts`), so that runs on the same services compare the same workload, none
    served from another's cache."""
    bootstrap = services.kafka_bootstrap
    create_topics(bootstrap, {IN: partitions, OUT: partitions, DLQ: 1})
    metrics_port = free_port()
    consumer_env = {
        "MMSENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MMSENT_REDIS_URL": services.redis_url or "",
        "MMSENT_INPUT_TOPIC": IN, "MMSENT_OUTPUT_TOPIC": OUT, "MMSENT_DLQ_TOPIC": DLQ,
        "MMSENT_GROUP_ID": "bench", "MMSENT_MAX_BATCH_SIZE": str(batch_size),
        "MMSENT_MAX_WAIT_MS": str(max_wait_ms), "MMSENT_METRICS_PORT": str(metrics_port),
        "MMSENT_METRICS_HOST": "127.0.0.1", "MMSENT_FETCH_ALLOW_CIDRS": "127.0.0.1/32",
        "MMSENT_LOG_LEVEL": "WARNING", **({"MMSENT_MODEL": model} if model else {}), **(env or {}),
    }
    counter = EventCounter(bootstrap, metrics_port)
    producer = post_producer(bootstrap)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="mmsent-bench-"))
    with consumer_process(consumer_env, metrics_port, log_dir / "consumer.log") as consumer:
        roles = {"consumer": consumer.pid, "broker": services.kafka.pid,
                 "redis": services.redis.pid if services.redis else None,
                 "bench (producer, image server)": os.getpid()}
        # warm-up: the first batches pay for allocator growth and tokenizer caches
        run_end_to_end(make_posts(2 * batch_size, n_photos, server, 0.3, seed=1, tag=tag), producer, counter, server,
                       "warm-up", None, roles, timeout_s)
        before = counter.stage_totals()
        full = run_end_to_end(make_posts(full_posts, n_photos, server, 0.3, seed=2, tag=tag), producer, counter, server,
                              "full", None, roles, timeout_s)
        after = counter.stage_totals()
        half = run_end_to_end(make_posts(half_posts, n_photos, server, 0.3, seed=3, tag=tag), producer, counter, server,
                              "half", full.posts_per_s / 2, roles, timeout_s) if half_posts else None
    return ServedRun(full, half, {key: after[key] - before[key] for key in after}, log_dir / "consumer.log")


def bottleneck(full: EndToEnd, stages: dict[str, float], model_only_posts_per_s: float, batch_size: int
               ) -> dict[str, Any]:
    """What limits end to end: the full (backlog) run against the model alone (the Scorer from JPEG bytes at the
    same batch size, one thread), and the consumer's stage totals over that run as occupancy: `model`, the share of
    its model threads' time spent in the model stage; `fetch`, how many batches were having their images fetched
    at once on average (the stage overlaps itself and the model: up to one batch more than there are model threads).

    `limit`: "the model" when end to end reaches MODEL_BOUND_SHARE of the model alone; else batches under half
    full (the model waited for posts); else the busier of the model threads (the model in the consumer is slower
    than alone: host work and the GIL beside it) and the image stage (fetch and CPU decode) when it is busy 70% of
    the time or more (not 100%: a short run's first fetch and last batch leave the model threads idle); else what
    the metrics do not time: the I/O loop's poll, batching, produce and commit, or the broker."""
    # torch: imported when this runs (the module docstring says why)
    from consumer.app import MODEL_CONCURRENCY as model_threads

    share = full.posts_per_s / model_only_posts_per_s
    posts = max(stages["posts"], 1.0)
    wall_s = full.posts / full.posts_per_s
    busy = {"model": stages["model"] / wall_s / model_threads, "fetch": stages["fetch"] / wall_s}
    per_post = {"end_to_end": 1000 / full.posts_per_s, "model_alone": 1000 / model_only_posts_per_s,
                "model_stage": 1000 * stages["model"] / posts / model_threads,  # over its threads together
                "fetch_stage": 1000 * stages["fetch"] / posts}
    fill = stages["posts"] / max(stages["batches"], 1.0) / batch_size
    if share >= MODEL_BOUND_SHARE:
        limit = "the model"
    elif fill < 0.5:
        limit = (f"input: batches held {100 * fill:.0f}% of {batch_size} posts on average, so the model waited for "
                 "posts (the consumer's I/O loop: poll, batching, produce and commit; or the broker)")
    elif busy["model"] >= max(0.7, busy["fetch"]):
        limit = (f"the model stage in the consumer: its {model_threads} threads {100 * busy['model']:.0f}% busy, "
                 f"{per_post['model_stage']:.2f} ms a post against {per_post['model_alone']:.2f} alone (host work "
                 "and the GIL beside the model: CPU per thread)")
    elif busy["fetch"] >= 0.7:
        limit = (f"fetch and decode: a batch in the image stage (cache, download, CPU decode; on the I/O loop) "
                 f"{100 * min(busy['fetch'], 1.0):.0f}% of the time while the model threads were "
                 f"{100 * busy['model']:.0f}% busy")
    else:
        limit = ("the consumer's I/O loop or the broker (poll, batching, produce, commit: not timed by the "
                 f"metrics): the model threads {100 * busy['model']:.0f}% busy, a batch being fetched "
                 f"{100 * busy['fetch']:.0f}% of the time")
    shares = full.cpu_shares or {}
    return {"limit": limit, "share_of_model_only": share, "model_only_posts_per_s": model_only_posts_per_s,
            "batch_fill": fill, "busy": busy, "ms_per_post": per_post,
            "consumer_cores": shares["consumer"] * (os.cpu_count() or 1) if "consumer" in shares else None}


def device_end_to_end(model: str, device: str, model_only: dict[str, Any], posts: int, *,
                      half_posts: int | None = None, max_wait_ms: int = 50, log_dir: Path | None = None,
                      timeout_s: float = 150) -> dict[str, Any]:
    """End to end on this machine's `device` for `scripts/device-check`: the consumer process scoring with `model`
    there, through the embedded broker and a Redis (noida-db's Redis-protocol server where there is no
    redis-server), images from a loopback server; batches of the size `model_only` was measured at
    (`mmsent.benchmarks.device.bench_serving`: the Scorer from JPEG bytes), so that `bottleneck` compares like with
    like.
    On a CPU the consumer's encoders run in PyTorch, as bench_serving's do (an ONNX export of random weights would
    cost the check seconds and change what is compared). Each of its three runs fails after `timeout_s`, so that a
    stalled consumer cannot spend a GPU check's few minutes.
    -> posts/s of the backlog run, p99 at half that rate and under the backlog, both runs' figures, the consumer's
    stage totals over the backlog run, and the bottleneck."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent.benchmarks.host import sample_photos

    batch_size = int(model_only["batch_size"])
    photos, source = sample_photos(max(64, posts))
    server = photo_server(photos)
    try:
        with EmbeddedServices(force_redis=True) as services:
            redis = Path(services.redis.command()[0]).name if services.redis else None
            run = serve_end_to_end(services, server, len(photos), model=model, batch_size=batch_size,
                                   max_wait_ms=max_wait_ms, full_posts=posts,
                                   half_posts=half_posts or max(batch_size * 4, posts // 2), log_dir=log_dir,
                                   env={"MMSENT_DEVICE": device, "MMSENT_CPU_RUNTIME": "torch"},
                                   timeout_s=timeout_s)
    finally:
        server.close()
    return {"photos": source, "redis": redis, "batch_size": batch_size, "max_wait_ms": max_wait_ms,
            "posts_per_s": run.full.posts_per_s, "half_load_p99_ms": run.half_load().latency_ms_p99,
            "full_load_p99_ms": run.full.latency_ms_p99, "full": asdict(run.full), "half": asdict(run.half_load()),
            "stages": run.stages,
            "bottleneck": bottleneck(run.full, run.stages, float(model_only["posts_per_s"]), batch_size)}


# -- the naive consumer -----------------------------------------------------------------------------------------


def run_naive(posts: list[bytes], bootstrap: str, model: str | None, server: LoopbackImageServer,
              cpu_runtime: str = "torch") -> dict[str, Any]:
    """The seed-style consumer: one record at a time, the image downloaded every time, captions padded to 128,
    fp32 in eager PyTorch, a synchronous produce and commit per record. Same model, same posts, same broker.
    `cpu_runtime="auto"` gives it our encoder runtime too, to show how much of the gain is the runtime."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent import Scorer

    topic = f"naive-{time.monotonic_ns()}"
    create_topics(bootstrap, {topic: 1})
    feeder = Producer({"bootstrap.servers": bootstrap})
    for value in posts:
        feeder.produce(topic, value=value)
    feeder.flush(60)
    scorer = Scorer.load(model, cpu_runtime=cpu_runtime, cpu_workers=1)  # plain calls, torch's own threads
    scorer.pad_to_length = 128
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([topic])
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    with httpx.Client(timeout=10) as http:
        # one untimed call first, as the consumer's warm-up: a long-running loop pays eager PyTorch's first call
        # (kernel selection, allocator growth) once, not once per 150 posts
        first = json.loads(posts[0])
        scorer.score([{"text": first["text"], "image": http.get(first["image_url"]).content}])
    requests_before = server.requests
    done, started = 0, 0.0
    spent = {"fetch": 0.0, "model": 0.0, "produce+commit": 0.0}
    with httpx.Client(timeout=10) as http:
        while done < len(posts):
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            if not started:
                started = time.monotonic()
            post = json.loads(message.value() or b"{}")
            t0 = time.monotonic()
            image = http.get(post["image_url"]).content
            t1 = time.monotonic()
            result = scorer.score([{"text": post["text"], "image": image}])[0]
            t2 = time.monotonic()
            producer.produce(f"{topic}-out", value=json.dumps({"post_id": post["post_id"], "label": result.label}))
            producer.flush(10)
            consumer.commit(message=message, asynchronous=False)
            t3 = time.monotonic()
            for stage, seconds in zip(spent, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                spent[stage] += seconds
            done += 1
    elapsed = time.monotonic() - started
    consumer.close()
    return {"posts": done, "posts_per_s": done / elapsed, "image_requests": server.requests - requests_before,
            "cpu_runtime": scorer.cpu_runtime, "cpu_precision": scorer.cpu_precision,
            "ms_per_post": {stage: 1000 * seconds / max(done, 1) for stage, seconds in spent.items()}}


# -- the whole run ----------------------------------------------------------------------------------------------

# End to end at this share of the model alone or more: the model is the limit (issue 28's aim, both precisions).
MODEL_BOUND_SHARE = 0.9
# The broker end to end runs through: one that holds an empty fetch, as Kafka does (run_all says why).
BENCH_BROKER = "tansu"
PRECISIONS = ("fp32", "int8")  # the CPU precisions measured side by side (MMSENT_CPU_PRECISION)
CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")  # what int8 and bf16 kernels use


def run_all(*, model: str | None, batch_size: int, max_wait_ms: int, e2e_posts: int, naive_posts: int,
            model_batch_sizes: list[int], seed_batch_sizes: list[int], min_seconds: float, precision_rounds: int,
            cpu_precision: str = "auto", partitions: int = 3, broker: str = BENCH_BROKER, e2e_rounds: int = 1
            ) -> dict[str, Any]:
    """The whole benchmark, in this order on this machine:

        matmul FLOP/s (in a child process)
          ─▶ model only, fp32 against int8 at `batch_size` (alternating rounds, `compare_models`)
          ─▶ model only, the batch-size sweep at `cpu_precision` (and the seed preset's)
          ─▶ end to end: `e2e_rounds` rounds of the consumer process once per precision (MMSENT_CPU_PRECISION),
             the same workload, the precisions alternating; the half-load run in the first round only
          ─▶ the naive seed-style consumer (eager PyTorch, fp32), and with our encoder runtime
          ─▶ ratios and the aims (`precision_figures`)

    A VM's speed drifts over minutes (one full-load run of the same consumer gave 126 to 159 posts/s within ten
    minutes on the 2-core dev VM, 2026-12-06), so one run per precision can put the drift into their ratio: with
    rounds alternating, each precision's figure is its median run, and every run's posts/s is kept.

    The consumers read from and write to `broker` (tooling.embedded.BROKERS), Tansu unless told: noida-db answers
    an empty fetch at once instead of holding it for fetch.wait.max.ms, so on it every idle reader (the consumer's
    feedback reader, a drained partition) spins its librdkafka thread and the broker, which on a 2-core machine
    takes cores from the consumer that a real Kafka would leave it."""
    # torch: imported when this runs (the module docstring says why)
    import onnxruntime
    import torch

    from mmsent.benchmarks.host import (
        bench_model,
        compare_models,
        matmul_flops_per_s_apart,
        precision_ran,
        sample_photos,
    )
    from mmsent.benchmarks.precision import cpu_flags

    name = model or "default"
    cpu, flag_text = cpu_flags(CPU_FLAGS)  # one reading of /proc/cpuinfo: the name and the flags
    cpu_name = platform.machine() if cpu == "unknown" else f"{cpu} ({platform.machine()})"
    flags = flag_text.split()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": {"name": cpu_name, "flags": flags, "cores": os.cpu_count()},
        "broker": broker,
        "machine": f"{cpu_name}, {os.cpu_count()} cores, int8/bf16 flags: {' '.join(flags) or 'none'} (of "
                   f"{', '.join(CPU_FLAGS)}), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
                   f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        "matmul_flops_per_s": matmul_flops_per_s_apart(),
    }
    print(f"matmul: {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    # posts: the rounds cycle through 4 batches' worth, captions and photos of the kinds end to end sees
    result["precision_model_only"] = compare_models([f"{name}@{p}" for p in PRECISIONS], batch_size,
                                                    precision_rounds, posts=4 * batch_size)
    for entry in result["precision_model_only"]["models"]:
        print(f"model only {entry['spec']} batch {batch_size} (ran {precision_ran(entry)}): "
              f"{entry['posts_per_s']:.1f} posts/s, {entry['batch_ms_p50']:.1f} ms/batch", flush=True)
    result["model_only"] = [bench_model(name, model_batch_sizes, min_seconds=min_seconds,
                                        compare_padding_at=batch_size, cpu_precision=cpu_precision)]
    if seed_batch_sizes:
        result["model_only"].append(bench_model("seed", seed_batch_sizes, min_seconds=min_seconds,
                                                compare_padding_at=None, cpu_precision=cpu_precision))
    for entry in result["model_only"]:
        for figure in entry["figures"]:
            print(f"model {entry['preset']} ({precision_ran(entry)}) batch {figure['batch_size']:>3} "
                  f"{figure['padding']:<8} {figure['posts_per_s']:8.1f} posts/s  {figure['batch_ms_p50']:8.1f} "
                  "ms/batch", flush=True)
    photos, _ = sample_photos(max(64, e2e_posts))
    server = photo_server(photos)
    with EmbeddedServices(force_redis=True, broker=broker) as services:
        served: dict[str, list[ServedRun]] = {precision: [] for precision in PRECISIONS}
        for round_index in range(e2e_rounds):
            for precision in PRECISIONS:
                served[precision].append(serve_precision(
                    services, server, len(photos), model, precision, batch_size=batch_size, max_wait_ms=max_wait_ms,
                    e2e_posts=e2e_posts, partitions=partitions, round_index=round_index))
        naive_input = make_posts(naive_posts, len(photos), server, 0.3, seed=4)
        naive = run_naive(naive_input, services.kafka_bootstrap, model, server, cpu_runtime="torch")
        print(f"naive: {naive['posts_per_s']:.1f} posts/s", flush=True)
        naive_fast = run_naive(naive_input, services.kafka_bootstrap, model, server, cpu_runtime="auto")
        print(f"naive with our encoder runtime ({naive_fast['cpu_runtime']}, {naive_fast['cpu_precision']}): "
              f"{naive_fast['posts_per_s']:.1f} posts/s", flush=True)
    server.close()
    result.update(batch_size=batch_size, max_wait_ms=max_wait_ms, e2e_rounds=e2e_rounds, naive=naive,
                  naive_fast=naive_fast)
    result["end_to_end"] = {precision: served_figures(runs, result, precision) for precision, runs in served.items()}
    result.update(precision_figures(result))
    for entry in result["model_only"]:
        achieved = entry["flops_per_post"] * max(f["posts_per_s"] for f in entry["figures"])
        entry["flops_fraction"] = achieved / result["matmul_flops_per_s"]
    return result


def serve_precision(services: EmbeddedServices, server: LoopbackImageServer, n_photos: int, model: str | None,
                    precision: str, *, batch_size: int, max_wait_ms: int, e2e_posts: int, partitions: int,
                    round_index: int = 0) -> ServedRun:
    """One end-to-end run with the consumer's encoders in `precision`: its full-load run, and in the first round
    its half-load run. The consumer logs at INFO so that its `model_loaded` line says which precision it resolved to
    (one more log line per batch: tens of microseconds against a batch's tens of milliseconds, alike for both
    precisions)."""
    half_posts = max(batch_size * 4, e2e_posts // 2) if round_index == 0 else 0
    run = serve_end_to_end(services, server, n_photos, model=model, batch_size=batch_size, max_wait_ms=max_wait_ms,
                           full_posts=e2e_posts, half_posts=half_posts, partitions=partitions,
                           tag=precision if round_index == 0 else f"{precision}-{round_index + 1}",
                           env={"MMSENT_CPU_PRECISION": precision, "MMSENT_LOG_LEVEL": "INFO"},
                           log_dir=Path(tempfile.mkdtemp(prefix=f"mmsent-bench-{precision}-")))
    for figure in [f for f in (run.full, run.half) if f is not None]:
        print(f"end to end {precision} {figure.load}, round {round_index + 1}: {figure.posts_per_s:.1f} posts/s, "
              f"p50/p95/p99 {figure.latency_ms_p50:.0f}/{figure.latency_ms_p95:.0f}/{figure.latency_ms_p99:.0f} ms",
              flush=True)
    return run


def consumer_log_field(log_path: Path, event: str, field: str) -> Any:
    """`field` of the consumer's first `event` line in its JSON log; None when it has none."""
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line that is not ours (a library's print)
            continue
        if isinstance(record, dict) and record.get("event") == event:
            return record.get(field)
    return None


def median_run(runs: list[ServedRun]) -> ServedRun:
    """The run whose full-load posts/s is the median of `runs` (of an even number, the slower of the middle two):
    one real run, whose latencies, CPU shares and stage totals go with its posts/s."""
    ordered = sorted(runs, key=lambda run: run.full.posts_per_s)
    return ordered[(len(ordered) - 1) // 2]


def served_figures(runs: list[ServedRun], result: dict[str, Any], precision: str) -> dict[str, Any]:
    """One precision's end-to-end figures (its median full-load run; the half-load run of the first round), set
    against the model alone in the same precision and batch size."""
    model_only = next(m for m in result["precision_model_only"]["models"] if m["asked"] == precision)
    run = median_run(runs)
    return {
        "full": asdict(run.full), "half": asdict(runs[0].half_load()), "stages": run.stages, "log": str(run.log_path),
        "full_runs_posts_per_s": [r.full.posts_per_s for r in runs],
        "consumer_cpu_precision": consumer_log_field(run.log_path, "model_loaded", "cpu_precision"),
        "bottleneck": bottleneck(run.full, run.stages, model_only["posts_per_s"], result["batch_size"]),
        "p99_bound_ms": result["max_wait_ms"] + 2 * model_only["batch_ms_p50"],
    }


def precision_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The headline: posts/s per precision (model only, end to end), their ratios, and the aims of issue 28."""
    model_only = {m["asked"]: m["posts_per_s"] for m in result["precision_model_only"]["models"]}
    e2e = {p: result["end_to_end"][p]["full"]["posts_per_s"] for p in PRECISIONS}
    naive = result["naive"]["posts_per_s"]
    share = {p: e2e[p] / model_only[p] for p in PRECISIONS}
    figures = {
        "model_only_posts_per_s": model_only, "end_to_end_posts_per_s": e2e, "share_of_model_only": share,
        "half_load_p99_ms": {p: result["end_to_end"][p]["half"]["latency_ms_p99"] for p in PRECISIONS},
        "model_int8_over_fp32": model_only["int8"] / model_only["fp32"],
        "end_to_end_int8_over_fp32": e2e["int8"] / e2e["fp32"],
        "end_to_end_over_naive": {p: e2e[p] / naive for p in PRECISIONS},
    }
    aims = [
        ("int8 model only / fp32 model only", figures["model_int8_over_fp32"], 2.0, "x"),
        ("int8 end to end / fp32 end to end", figures["end_to_end_int8_over_fp32"], 1.8, "x"),
        ("fp32 end to end / fp32 model only", share["fp32"], MODEL_BOUND_SHARE, "%"),
        ("int8 end to end / int8 model only", share["int8"], MODEL_BOUND_SHARE, "%"),
        ("int8 end to end / eager seed-style loop", figures["end_to_end_over_naive"]["int8"], 8.0, "x"),
    ]
    figures["aims"] = [{"aim": aim, "value": value, "at_least": target, "unit": unit, "met": value >= target}
                       for aim, value, target, unit in aims]
    return figures


def _times(value: float, unit: str) -> str:
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"


def render_markdown(result: dict[str, Any], command: str) -> str:
    return "\n".join([f"## {result['date']} — `{command}`", "",
                      f"Machine: {result['machine']}; measured fp32 matmul (the faster of torch and ONNX Runtime) "
                      f"{result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s.", "",
                      *_render_precisions(result), *_render_sweep(result), *_render_end_to_end(result),
                      *_render_naive(result)])


def _render_precisions(result: dict[str, Any]) -> list[str]:
    compared, e2e = result["precision_model_only"], result["end_to_end"]
    rounds = result.get("e2e_rounds", 1)
    e2e_how = ("the consumer process once per MMSENT_CPU_PRECISION, backlog" if rounds == 1 else
               f"the consumer process once per MMSENT_CPU_PRECISION in each of {rounds} rounds, the precisions "
               "alternating, backlog, the median run")
    lines = [f"### fp32 against int8 (batch {result['batch_size']}; model only: {compared['rounds']} rounds "
             f"alternating over {compared['posts']} posts, median batch; end to end: {e2e_how})",
             "", "| precision asked | ran (model only / consumer) | model only posts/s | end to end posts/s | "
             "end to end / model only | half-load p99 ms | end to end / eager loop |", "|---|---|---|---|---|---|---|"]
    for p in PRECISIONS:
        m = next(m for m in compared["models"] if m["asked"] == p)
        lines.append(f"| {p} | {m['cpu_precision']} / {e2e[p]['consumer_cpu_precision'] or 'not logged'} | "
                     f"{m['posts_per_s']:.1f} | {result['end_to_end_posts_per_s'][p]:.1f} | "
                     f"{100 * result['share_of_model_only'][p]:.0f}% | {result['half_load_p99_ms'][p]:.0f} | "
                     f"{result['end_to_end_over_naive'][p]:.1f}x |")
    lines += ["", "| aim (issue 28) | measured | at least | |", "|---|---|---|---|"]
    for aim in result["aims"]:
        lines.append(f"| {aim['aim']} | {_times(aim['value'], aim['unit'])} | "
                     f"{_times(aim['at_least'], aim['unit'])} | {'met' if aim['met'] else '**not met**'} |")
    lines += ["", "What each model-only scorer resolved to, and why: " + "; ".join(
        f"asked {m['asked']}, ran {m['precision_note']}" for m in compared["models"]) + ".", ""]
    return lines


def _render_sweep(result: dict[str, Any]) -> list[str]:
    from mmsent.benchmarks.host import precision_ran

    lines = ["### Model only (`Scorer.score`, images as JPEG bytes: decode + CNN + text + fusion)", "",
             "| preset | precision | batch | padding | posts/s | ms/batch (p50) | ms/batch (max) |",
             "|---|---|---|---|---|---|---|"]
    for entry in result["model_only"]:
        for f in entry["figures"]:
            lines.append(f"| {entry['preset']} | {precision_ran(entry)} | {f['batch_size']} | {f['padding']} | "
                         f"{f['posts_per_s']:.1f} | {f['batch_ms_p50']:.1f} | {f['batch_ms_max']:.1f} |")
    lines += ["", "| preset | GFLOPs/post | share of fp32 matmul FLOP/s at best batch | photos |", "|---|---|---|---|"]
    for entry in result["model_only"]:
        lines.append(f"| {entry['preset']} | {entry['flops_per_post'] / 1e9:.2f} | "
                     f"{100 * entry['flops_fraction']:.0f}% | {entry['photos']} |")
    return lines + [""]


def _render_end_to_end(result: dict[str, Any]) -> list[str]:
    runs = [(p, e) for p in PRECISIONS for e in (result["end_to_end"][p]["full"], result["end_to_end"][p]["half"])]
    lines = [f"### End to end ({result.get('broker', 'noida-db')} broker, Redis, image server; batch "
             f"{result['batch_size']}, "
             f"max wait {result['max_wait_ms']} ms; 30% of posts repeat an earlier image)", "",
             "| precision | load | posts | offered/s | posts/s | p50 ms | p95 ms | p99 ms | image requests |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p, e in runs:
        offered = f"{e['offered_per_s']:.1f}" if e["offered_per_s"] else "backlog"
        lines.append(f"| {p} | {e['load']} | {e['posts']} | {offered} | {e['posts_per_s']:.1f} | "
                     f"{e['latency_ms_p50']:.0f} | {e['latency_ms_p95']:.0f} | {e['latency_ms_p99']:.0f} | "
                     f"{e['image_requests']} |")
    shares = [(p, e) for p, e in runs if e.get("cpu_shares")]
    if shares:
        roles = list(shares[0][1]["cpu_shares"])
        lines += ["", "Where the cores went, as shares of all cores' time from the first post produced to the last "
                  "event (CPU time per process from /proc; \"other\" is the rest of /proc/stat's busy time, a point "
                  "or two below 0 where the process and machine counters round apart):", "",
                  "| precision | load | " + " | ".join(roles) + " |", "|---|---|" + "---|" * len(roles)]
        for p, e in shares:
            lines.append(f"| {p} | {e['load']} | " + " | ".join(f"{100 * e['cpu_shares'][r]:.0f}%" for r in roles)
                         + " |")
    lines.append("")
    if result.get("e2e_rounds", 1) > 1:
        lines += ["Every full-load run's posts/s, in the order run (the table's is the median run's): " + "; ".join(
            f"{p} " + " / ".join(f"{x:.1f}" for x in result["end_to_end"][p]["full_runs_posts_per_s"])
            for p in PRECISIONS) + ".", ""]
    for p in PRECISIONS:
        run = result["end_to_end"][p]
        lines.append(f"- {p}: p99 at half load **{run['half']['latency_ms_p99']:.0f} ms** against the bound max_wait "
                     f"+ 2 × model batch time = {run['p99_bound_ms']:.0f} ms; what limits the backlog run: "
                     f"{run['bottleneck']['limit']}")
    return lines + [""]


def _render_naive(result: dict[str, Any]) -> list[str]:
    naive, naive_fast = result["naive"], result["naive_fast"]

    def per_post(run: dict[str, Any]) -> str:
        return ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in run["ms_per_post"].items())

    return [f"Eager seed-style consumer (one record at a time, download every time, pad to 128, fp32 eager "
            f"PyTorch, sync commit per record): {naive['posts_per_s']:.1f} posts/s over {naive['posts']} posts, "
            f"{naive['image_requests']} image requests; per post: {per_post(naive)}. The same consumer with our "
            f"encoder runtime ({naive_fast['cpu_runtime']}, {naive_fast['cpu_precision']}): "
            f"{naive_fast['posts_per_s']:.1f} posts/s; per post: {per_post(naive_fast)}.", ""]


# -- commands ---------------------------------------------------------------------------------------------------


@bench_app.command("all")
def bench_all(
    write: Annotated[Path | None, typer.Option(help="Append the results to this Markdown file.")] = None,
    model: Annotated[str | None, typer.Option(help="Model directory or preset; default: the packaged model.")] = None,
    batch_size: Annotated[int, typer.Option(help="MMSENT_MAX_BATCH_SIZE for end to end.")] = 32,
    max_wait_ms: Annotated[int, typer.Option(help="MMSENT_MAX_WAIT_MS for end to end.")] = 50,
    e2e_posts: Annotated[int, typer.Option(help="Posts in each full-load run.")] = 1500,
    naive_posts: Annotated[int, typer.Option(help="Posts through the naive consumer.")] = 150,
    e2e_rounds: Annotated[int, typer.Option(min=1, help="End-to-end full-load runs per precision, alternating; "
                                                       "the median run is reported.")] = 3,
    seed: Annotated[bool, typer.Option(help="Also bench the seed preset (BERT-base + ResNet-50).")] = True,
    cpu_precision: Annotated[str, typer.Option(help="The batch-size sweep's CPU precision: auto | fp32 | int8 | bf16 "
                                                    "(the fp32 against int8 figures are taken either way).")] = "auto",
    broker: Annotated[str, typer.Option(help="The embedded broker end to end runs through: tansu | noida-db "
                                             "(noida-db answers empty fetches at once, so idle readers spin).")]
    = BENCH_BROKER,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the raw figures as JSON here.")] = None,
) -> None:
    """Everything, in one run, so that ratios compare figures measured side by side: fp32 against int8 (model only
    and end to end), the batch-size sweep, and the eager seed-style consumer."""
    if broker not in BROKERS:  # said now, not after minutes of model-only rounds
        raise typer.BadParameter(f"one of {', '.join(BROKERS)}", param_hint="--broker")
    result = run_all(model=model, batch_size=batch_size, max_wait_ms=max_wait_ms, e2e_posts=e2e_posts,
                     naive_posts=naive_posts, model_batch_sizes=[1, 8, 32, 128],
                     seed_batch_sizes=[1, 8, 32] if seed else [], min_seconds=3.0, precision_rounds=20,
                     cpu_precision=cpu_precision, broker=broker, e2e_rounds=e2e_rounds)
    _report(result, "mmsent bench all" + (f" --batch-size {batch_size}" if batch_size != 32 else "")
            + (f" --e2e-rounds {e2e_rounds}" if e2e_rounds != 3 else "")
            + (f" --broker {broker}" if broker != BENCH_BROKER else ""), write, json_out)


@bench_app.command("smoke")
def bench_smoke(
    model: Annotated[str, typer.Option(help="Model directory or preset.")] = "tiny-random",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the raw figures as JSON here.")] = None,
) -> None:
    """A few seconds of every part, to prove the command works (run by the test suite; figures meaningless)."""
    result = run_all(model=model, batch_size=8, max_wait_ms=20, e2e_posts=48, naive_posts=8,
                     model_batch_sizes=[1, 8], seed_batch_sizes=[], min_seconds=0.1, precision_rounds=2, e2e_rounds=2)
    _report(result, "mmsent bench smoke", None, json_out)


@bench_app.command("shadow")
def bench_shadow(
    model: Annotated[str | None, typer.Option(help="The primary (directory or preset); default: packaged.")] = None,
    shadow: Annotated[str | None, typer.Option(help="The shadow model; default: the primary's again.")] = None,
    batch_size: Annotated[int, typer.Option(help="Posts per batch.")] = 32,
    rounds: Annotated[int, typer.Option(help="Batches timed each way.")] = 8,
) -> None:
    """What a shadow model (MMSENT_SHADOW_MODEL) costs the primary: its model stage per batch, with and without."""
    # torch: imported when this runs (the module docstring says why)
    from tooling.shadowbench import render_shadow, run_shadow

    typer.echo(render_shadow(run_shadow(model, shadow, batch_size, rounds), "mmsent bench shadow"))


@bench_app.command("models")
def bench_models(
    models: Annotated[list[str], typer.Argument(
        help="MODEL[@PRECISION] ...: model directories or presets ('default': the packaged model), each optionally "
             "with its CPU precision after an @ (fp32, int8 or auto), e.g. `default@fp32 default@int8` or "
             "`../v2.2@fp32 ./new-model@int8`; the first is the reference")],
    batch_size: Annotated[int, typer.Option(help="Posts per batch.")] = 32,
    rounds: Annotated[int, typer.Option(help="Batches timed per model.")] = 8,
    cpu_precision: Annotated[str, typer.Option(help="auto | fp32 | int8 | bf16: the CPU precision of every model that "
                                                    "names none with @.")] = "auto",
) -> None:
    """Model-only posts/s of several models on the same posts, timed in alternation: ratios measured side by side.
    Each line says the precision its encoders ran in on this machine (what `auto` resolved to)."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent.benchmarks.host import compare_models

    result = compare_models(models, batch_size, rounds, cpu_precision)
    typer.echo(f"model only, batch {batch_size}, {rounds} rounds alternating, {result['threads']} threads, "
               f"{result['photos']}:")
    for m in result["models"]:
        why = m["precision_note"].removeprefix(f"{m['cpu_precision']}: ")
        typer.echo(f"  {m['posts_per_s']:7.1f} posts/s  x{m['of_first']:.2f}  {m['spec']} ({m['info']['name']} "
                   f"{m['info']['version']}), ran {m['cpu_precision']} ({why})")


@bench_app.command("precision")
def bench_precision(
    preset: Annotated[str, typer.Option(help="The preset measured (random weights).")] = "seed",
    batch_size: Annotated[list[int] | None, typer.Option(help="repeatable; default: 8 and 32")] = None,
    posts: Annotated[int, typer.Option(help="Posts whose labels are compared across precisions.")] = 64,
    rounds: Annotated[int, typer.Option(help="Batches timed per precision and batch size.")] = 4,
) -> None:
    """The big preset on the CPU in fp32, bf16 and int8: posts/s and the labels' agreement with fp32."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent.benchmarks.precision import compare_precisions, render_precision

    typer.echo(render_precision(compare_precisions(preset, batch_size or [8, 32], posts, rounds)))


@bench_app.command("device")
def bench_device_command(
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one) | cpu | cuda | cuda:N")] = "auto",
    arch: Annotated[list[str] | None, typer.Option(help="default and/or seed (repeatable); default: both")] = None,
    batch_size: Annotated[list[int] | None, typer.Option(help="repeatable; default: 1, 32, 256, 1024")] = None,
    seconds: Annotated[float, typer.Option(help="timed seconds per figure")] = 2.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the raw figures as JSON here.")] = None,
) -> None:
    """The model on a device (random weights), what scripts/device-check runs: from tensors already there, posts/s
    per batch size in fp32, bf16 and compiled (CUDA only), FLOPs per post, share of the bf16 peak, GPU utilisation;
    batched decode against PIL; the Scorer from JPEG bytes and its latency at half load; fine-tuning samples/s."""
    # torch: imported when this runs (the module docstring says why)
    from mmsent.benchmarks.device import bench_device, bench_serving, bench_training

    result = bench_device(device, archs=tuple(arch or ("default", "seed")),
                          batch_sizes=tuple(batch_size or (1, 32, 256, 1024)), seconds=seconds)
    result["serving"] = bench_serving(device, seconds=seconds)
    result["training"] = bench_training(device)
    typer.echo(json.dumps(result, indent=2))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


def _report(result: dict[str, Any], command: str, write: Path | None, json_out: Path | None) -> None:
    text = render_markdown(result, command)
    typer.echo("\n" + text)
    if write is not None:
        existing = write.read_text() if write.exists() else "# Benchmarks\n\n"
        write.write_text(existing.rstrip() + "\n\n" + text + "\n")
        typer.echo(f"appended to {write}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


@bench_app.command("inspect")
def bench_inspect(
    rate: Annotated[float, typer.Option(help="Events per second produced (each with its post).")] = 500.0,
    seconds: Annotated[float, typer.Option(help="How long the load lasts.")] = 30.0,
    bootstrap: Annotated[str | None, typer.Option(help="A broker to use (default: an embedded one).")] = None,
) -> None:
    """Does `mmsent inspect` keep up? Its lag behind the topic end under a steady load, and its CPU share."""
    from tooling.inspectbench import render_inspect_bench, run_inspect_bench  # psutil: the tools extra

    typer.echo(render_inspect_bench(run_inspect_bench(rate, seconds, bootstrap), "mmsent bench inspect"))
