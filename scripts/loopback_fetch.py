"""Fetching a batch's photos from the bench's loopback image server (`tooling.localimages.LoopbackImageServer`),
as the consumer's image stage does: batches of 22 photos (the bench's 32 posts less its ~30% repeats), 8 at a time
per host (`MMSENT_FETCH_PER_HOST_CONCURRENCY`), over kept-alive connections, ~50 KB MVSA photos. Idle machine.

* `server`: the median wall time of a batch with the server's Nagle's algorithm on and off (a bare httpx client),
  the two alternating for `--rounds`.
* `clients`: the CPU per fetch of the thread running the event loop (`time.thread_time()`, so the server's threads
  in this process are not counted), `ImageFetcher.fetch` against bare aiohttp and bare httpx clients, each warmed
  up on one pass (connections made), then timed on the next, alternating for `--rounds`.

    .venv/bin/python scripts/loopback_fetch.py server [--rounds 3] [--batches 30]
    .venv/bin/python scripts/loopback_fetch.py clients [--rounds 2] [--batches 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import structlog

from consumer.fetch import ImageFetcher
from consumer.settings import Settings
from mmsent.benchmarks.host import sample_photos
from tooling.bench import photo_server
from tooling.localimages import LoopbackImageServer

BATCH = 22
PER_HOST = 8
Get = Callable[[str], Awaitable[object]]


async def batch_times(server: LoopbackImageServer, get: Get, n_photos: int, batches: int, tag: str) -> list[float]:
    """Seconds per batch; every URL new (the tag and index in its query), so no cache answers."""
    slots = asyncio.Semaphore(PER_HOST)

    async def one(index: int) -> None:
        async with slots:
            await get(f"{server.base}/p{index % n_photos}.jpg?{tag}={index}")

    times = []
    for start in range(0, batches * BATCH, BATCH):
        started = time.monotonic()
        await asyncio.gather(*(one(start + k) for k in range(BATCH)))
        times.append(time.monotonic() - started)
    return times


async def httpx_get(server: LoopbackImageServer, n_photos: int, batches: int, tag: str) -> list[float]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:  # new connections
        async def get(url: str) -> bytes:
            response = await client.get(url)
            response.raise_for_status()
            return response.content

        await batch_times(server, get, n_photos, batches, f"{tag}-warm")
        return await batch_times(server, get, n_photos, batches, tag)


async def cpu_per_fetch(server: LoopbackImageServer, client: str, n_photos: int, batches: int) -> tuple[float, float]:
    """(loop thread CPU ms, wall ms) per fetch for `client`, after a warm-up pass."""
    async def timed(get: Get) -> tuple[float, float]:
        await batch_times(server, get, n_photos, batches, "warm")
        cpu, wall = time.thread_time(), time.monotonic()
        await batch_times(server, get, n_photos, batches, "timed")
        fetches = batches * BATCH
        return 1000 * (time.thread_time() - cpu) / fetches, 1000 * (time.monotonic() - wall) / fetches

    if client == "ours":
        settings = Settings.model_validate({"fetch_allow_cidrs": "127.0.0.1/32", "fetch_negative_cache_s": 0})
        async with ImageFetcher(settings) as fetcher:
            return await timed(fetcher.fetch)
    if client == "aiohttp":
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            async def get(url: str) -> bytes:
                async with session.get(url) as response:
                    return await response.read()

            return await timed(get)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as httpx_client:
        async def get_httpx(url: str) -> bytes:
            return (await httpx_client.get(url)).content

        return await timed(get_httpx)


CLIENTS = {"ours": "ImageFetcher.fetch (aiohttp)", "aiohttp": "bare aiohttp", "httpx": "bare httpx"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["server", "clients"])
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 for server, 2 for clients")
    parser.add_argument("--batches", type=int, default=None, help="default: 30 for server, 50 for clients")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no per-fetch lines
    photos, source = sample_photos(64)  # MVSA's where ../shared/data has them, else generated ones
    print(source)
    with photo_server(photos) as server:
        if args.what == "server":
            for round_ in range(args.rounds or 3):
                for nodelay in (False, True):
                    server.handler.disable_nagle_algorithm = nodelay
                    times = asyncio.run(httpx_get(server, len(photos), args.batches or 30, f"r{round_}{nodelay}"))
                    print(f"{'TCP_NODELAY' if nodelay else 'Nagle on   '}  {BATCH} photos, {PER_HOST} at a time: "
                          f"median {1000 * statistics.median(times):.1f} ms a batch")
            server.handler.disable_nagle_algorithm = True
            return
        for _ in range(args.rounds or 2):
            for client, name in CLIENTS.items():
                cpu_ms, wall_ms = asyncio.run(cpu_per_fetch(server, client, len(photos), args.batches or 50))
                print(f"{name:30s} loop thread CPU {cpu_ms:.3f} ms a fetch, wall {wall_ms:.3f} ms a fetch")


if __name__ == "__main__":
    main()
