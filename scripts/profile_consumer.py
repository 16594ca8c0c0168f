"""Where the consumer's CPU goes under a backlog: `mmsent consume` as its own process (as `mmsent bench` runs it),
a backlog of posts through the embedded broker, Redis and a loopback image server, and while it drains:

* the posts/s, and the consumer's own stage totals (seconds in fetch+decode, in the model stage),
* the CPU of each of its threads, from /proc/<pid>/task/*/stat (the model threads, the I/O loop, the decode
  threads, librdkafka's, ONNX Runtime's workers...), and from /proc/<pid>/task/*/schedstat the time each spent
  runnable but waiting for a core (so a thread's wall time splits into on a core, waiting for one, and asleep:
  waiting for work, a lock or the GIL),
* with `--py-spy FILE`, a py-spy profile of the whole run (`--native`: C frames too), speedscope, collapsed
  stacks per thread (.txt) or SVG by name; `--gil` keeps only the samples of the thread holding the GIL, so that
  a .txt's samples per thread over 100 a second of the run are each thread's share of the GIL;
* with `--model-only`, the model alone on the same photos (the Scorer from JPEG bytes, batch as given, one thread),
  for the share end to end reaches of it.

    bench producer ──posts──▶ broker ──▶ consumer process ──events──▶ broker
                                            │   ▲ images (loopback server, Redis cache)
                     /proc/<pid>/task ◀─────┘   └── py-spy record --pid

    .venv/bin/python scripts/profile_consumer.py [--posts 320] [--broker tansu|noida-db]
        [--env MMSENT_CPU_PRECISION=int8] [--py-spy /tmp/consumer.speedscope.json [--native] [--gil]] [--model-only]
        [--idle-s 10] [--photos DIR]

Figures on a shared machine are noisy: compare runs made one after the other, and say the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tooling.bench import (
    BENCH_BROKER,
    DLQ,
    IN,
    OUT,
    EventCounter,
    consumer_process,
    make_posts,
    photo_server,
    post_producer,
    run_end_to_end,
)
from tooling.embedded import BROKERS, EmbeddedServices, create_topics, free_port

MVSA_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvsa-single" / "images"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread of process `pid`, keyed "tid name" (Python's threads are all named
    "python" here: `--py-spy` dumps map a tid to its Python name)."""
    by_thread: dict[str, float] = defaultdict(float)
    for key, stat, _ in _each_thread(pid):
        fields = stat[stat.rindex(")") + 2 :].split()
        by_thread[key] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return dict(by_thread)


def thread_sched_s(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of process `pid`, keyed as `thread_cpu_s` keys them: (seconds on a core, seconds runnable but
    waiting for one), the first two fields of its schedstat (nanoseconds; absent where the kernel keeps none)."""
    return {key: (int(fields[0]) / 1e9, int(fields[1]) / 1e9)
            for key, _, schedstat in _each_thread(pid) if len(fields := schedstat.split()) >= 2}


def _each_thread(pid: int) -> Iterator[tuple[str, str, str]]:
    """("tid name", its /proc stat, its schedstat or "") for each thread of `pid` still alive."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            schedstat = (task / "schedstat").read_text() if (task / "schedstat").exists() else ""
        except OSError:  # the thread ended meanwhile
            continue
        yield f"{task.name} {stat[stat.index('(') + 1 : stat.rindex(')')]}", stat, schedstat


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process `pid`, its ended threads included (the decode threads end after each image)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def python_thread_names(pid: int) -> dict[str, str]:
    """tid -> the Python thread's name, from one `py-spy dump` (empty when py-spy is missing or refused)."""
    try:
        dump = subprocess.run([_py_spy(), "dump", "--json", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=30)
        threads = json.loads(dump.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}
    return {str(t["os_thread_id"]): t.get("thread_name") or "?" for t in threads if t.get("os_thread_id")}


def load_photos(directory: Path | None, count: int) -> tuple[list[bytes], str]:
    if directory is None and MVSA_PHOTOS.is_dir():
        directory = MVSA_PHOTOS
    if directory is not None:
        paths = sorted(directory.glob("*.jpg"))[:count]
        return [p.read_bytes() for p in paths], f"{len(paths)} photos from {directory}"
    from mmsent.benchmarks.host import sample_photos  # torch: only when needed

    return sample_photos(count)


def model_only_posts_per_s(model: str | None, photos: list[bytes], batch_size: int, env: dict[str, str]) -> float:
    """The Scorer alone from JPEG bytes, as `mmsent bench` times it, with the consumer's precision setting."""
    from mmsent import Scorer
    from mmsent.benchmarks.host import synthetic_captions, time_batches

    scorer = Scorer.load(model, cpu_precision=env.get("MMSENT_CPU_PRECISION", "auto"))
    posts = [{"text": text, "image": photo} for text, photo in zip(synthetic_captions(len(photos)), photos,
                                                                     strict=True)]
    times = time_batches(scorer, posts, batch_size, min_seconds=8.0)
    return batch_size * len(times) / sum(times)


def profile(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(item.split("=", 1) for item in args.env)
    photos, photo_source = load_photos(args.photos, max(64, args.posts))
    print(photo_source, flush=True)
    server = photo_server(photos)
    log_dir = Path(tempfile.mkdtemp(prefix="mmsent-profile-"))
    result: dict[str, Any] = {"photos": photo_source, "broker": args.broker, "env": env, "posts": args.posts,
                              "log_dir": str(log_dir)}
    with EmbeddedServices(force_redis=True, broker=args.broker) as services:
        bootstrap = services.kafka_bootstrap
        create_topics(bootstrap, {IN: 3, OUT: 3, DLQ: 1})
        metrics_port = free_port()
        consumer_env = {
            "MMSENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MMSENT_REDIS_URL": services.redis_url or "",
            "MMSENT_INPUT_TOPIC": IN, "MMSENT_OUTPUT_TOPIC": OUT, "MMSENT_DLQ_TOPIC": DLQ,
            "MMSENT_GROUP_ID": "profile", "MMSENT_MAX_BATCH_SIZE": str(args.batch_size), "MMSENT_MAX_WAIT_MS": "50",
            "MMSENT_METRICS_PORT": str(metrics_port), "MMSENT_METRICS_HOST": "127.0.0.1",
            "MMSENT_FETCH_ALLOW_CIDRS": "127.0.0.1/32", "MMSENT_LOG_LEVEL": "WARNING",
            **({"MMSENT_MODEL": args.model} if args.model else {}), **env,
        }
        counter = EventCounter(bootstrap, metrics_port)
        producer = post_producer(bootstrap)
        with consumer_process(consumer_env, metrics_port, log_dir / "consumer.log") as consumer:
            roles = {"consumer": consumer.pid, "broker": services.kafka.pid,
                     "redis": services.redis.pid if services.redis else None, "bench": os.getpid()}
            run_end_to_end(make_posts(2 * args.batch_size, len(photos), server, 0.3, seed=1), producer, counter,
                           server, "warm-up", None, roles)
            if args.idle_s:  # what the consumer costs with nothing to do: polling, timers
                idle_before = thread_cpu_s(consumer.pid)
                time.sleep(args.idle_s)
                idle_after = thread_cpu_s(consumer.pid)
                result["idle_thread_cores"] = {key: round((cpu - idle_before.get(key, 0.0)) / args.idle_s, 3)
                                               for key, cpu in idle_after.items()
                                               if cpu - idle_before.get(key, 0.0) >= 0.005 * args.idle_s}
            stages_before, threads_before = counter.stage_totals(), thread_cpu_s(consumer.pid)
            sched_before = thread_sched_s(consumer.pid)
            process_before = process_cpu_s(consumer.pid)
            spy = _start_py_spy(consumer.pid, args.py_spy, args.native, args.gil) if args.py_spy else None
            full = run_end_to_end(make_posts(args.posts, len(photos), server, 0.3, seed=2), producer, counter,
                                  server, "full", None, roles)
            threads_after, stages_after = thread_cpu_s(consumer.pid), counter.stage_totals()
            sched_after = thread_sched_s(consumer.pid)
            process_s = process_cpu_s(consumer.pid) - process_before
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait(120)
            python_names = python_thread_names(consumer.pid)  # after: one py-spy at a time attaches
    server.close()
    wall_s = full.posts / full.posts_per_s

    def label(key: str) -> str:
        return f"{key} {python_names.get(key.split()[0], '')}".strip()

    threads = {label(key): cpu - threads_before.get(key, 0.0) for key, cpu in threads_after.items()}
    # of each thread's wall time: on a core, runnable but waiting for one; the rest asleep (work, a lock, the GIL)
    sched: dict[str, tuple[float, float]] = {}
    for key, (ran, waited) in sched_after.items():
        ran_before, waited_before = sched_before.get(key, (0.0, 0.0))
        sched[label(key)] = ((ran - ran_before) / wall_s, (waited - waited_before) / wall_s)
    threads["threads that ended (decodes)"] = process_s - sum(threads.values())
    result.update(
        consumer_cores=process_s / wall_s, consumer_cpu_ms_per_post=1000 * process_s / full.posts,
        posts_per_s=full.posts_per_s, wall_s=wall_s, cpu_shares=full.cpu_shares,
        stages={k: stages_after[k] - stages_before[k] for k in stages_after},
        thread_cores={name: cpu / wall_s for name, cpu in sorted(threads.items(), key=lambda kv: -kv[1])
                      if cpu / wall_s >= 0.005},
        thread_on_waiting_asleep={name: [round(on, 3), round(waiting, 3), round(1 - on - waiting, 3)]
                                  for name, (on, waiting) in sorted(sched.items(), key=lambda kv: -kv[1][0])
                                  if on >= 0.05},
    )
    if args.model_only:
        result["model_only_posts_per_s"] = model_only_posts_per_s(args.model, photos[:64], args.batch_size, env)
        result["share_of_model_only"] = full.posts_per_s / result["model_only_posts_per_s"]
    return result


def _start_py_spy(pid: int, out: Path, native: bool, gil: bool) -> subprocess.Popen[bytes]:
    """py-spy on the consumer; `native` (C frames too) costs the consumer much more of its time, so less rate;
    `gil`: only the samples of a thread that holds the GIL."""
    # .txt: collapsed stacks, one line per stack with its thread first, for grep and sort
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    how = ["--native", "--rate", "50"] if native else ["--rate", "100"]
    how += ["--threads"] if fmt == "raw" else []
    how += ["--gil"] if gil else []
    spy = subprocess.Popen([_py_spy(), "record", *how, "--pid", str(pid), "--format", fmt, "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the backlog starts
    return spy


def _py_spy() -> str:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=320, help="posts in the backlog")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--broker", choices=sorted(BROKERS), default=BENCH_BROKER,
                        help="the embedded broker (noida-db answers empty fetches at once: its clients spin)")
    parser.add_argument("--model", help="model directory or preset (default: the packaged model)")
    parser.add_argument("--env", action="append", default=[], metavar="MMSENT_X=V", help="more consumer settings")
    parser.add_argument("--photos", type=Path, help="a folder of JPEGs (default: the MVSA photos when present)")
    parser.add_argument("--py-spy", type=Path, help="record a py-spy profile of the consumer to this file")
    parser.add_argument("--idle-s", type=float, default=0.0, help="first measure the idle consumer this long")
    parser.add_argument("--native", action="store_true", help="py-spy: C frames too (slows the consumer more)")
    parser.add_argument("--gil", action="store_true", help="py-spy: only samples that hold the GIL")
    parser.add_argument("--model-only", action="store_true", help="also time the model alone on the same photos")
    print(json.dumps(profile(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
