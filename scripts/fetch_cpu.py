"""The event loop thread's CPU per image fetch: `ImageFetcher.fetch` against bare aiohttp and bare httpx clients.

The same loopback image server (`tooling.localimages.LoopbackImageServer`, MVSA photos of ~50 KB), the same load
as the consumer's image stage (batches of 22 photos, 8 at a time); CPU is `time.thread_time()` of the thread
running the loop, so the server's threads in this process are not counted. Each client warms up on one pass
first (connections made), then is timed on the next; the clients alternate for `--rounds`:

    .venv/bin/python scripts/fetch_cpu.py [--rounds 2] [--photos 1100]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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


async def drive(server: LoopbackImageServer, get: Get, n_photos: int, total: int, tag: str) -> None:
    slots = asyncio.Semaphore(PER_HOST)

    async def one(index: int) -> None:
        async with slots:
            await get(f"{server.base}/p{index % n_photos}.jpg?{tag}={index}")  # a new URL: no cache answers

    for start in range(0, total, BATCH):
        await asyncio.gather(*(one(start + k) for k in range(BATCH)))


async def timed(server: LoopbackImageServer, get: Get, n_photos: int, total: int) -> tuple[float, float]:
    """(loop thread CPU ms, wall ms) per fetch, after a warm-up pass."""
    await drive(server, get, n_photos, total, "warm")
    cpu, wall = time.thread_time(), time.monotonic()
    await drive(server, get, n_photos, total, "timed")
    return 1000 * (time.thread_time() - cpu) / total, 1000 * (time.monotonic() - wall) / total


async def ours(server: LoopbackImageServer, n_photos: int, total: int) -> tuple[float, float]:
    settings = Settings.model_validate({"fetch_allow_cidrs": "127.0.0.1/32", "fetch_negative_cache_s": 0})
    async with ImageFetcher(settings) as fetcher:
        return await timed(server, fetcher.fetch, n_photos, total)


async def bare_aiohttp(server: LoopbackImageServer, n_photos: int, total: int) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        async def get(url: str) -> bytes:
            async with session.get(url) as response:
                return await response.read()

        return await timed(server, get, n_photos, total)


async def bare_httpx(server: LoopbackImageServer, n_photos: int, total: int) -> tuple[float, float]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
        async def get(url: str) -> bytes:
            return (await client.get(url)).content

        return await timed(server, get, n_photos, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photos", type=int, default=1100, help="fetches timed per client and round")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no per-fetch lines
    photos, source = sample_photos(64)  # MVSA's where ../shared/data has them, else generated ones
    print(source)
    clients = {"ImageFetcher.fetch (aiohttp)": ours, "bare aiohttp": bare_aiohttp, "bare httpx": bare_httpx}
    with photo_server(photos) as server:
        for _ in range(args.rounds):
            for name, client in clients.items():
                cpu_ms, wall_ms = asyncio.run(client(server, len(photos), args.photos))
                print(f"{name:30s} loop thread CPU {cpu_ms:.3f} ms a fetch, wall {wall_ms:.3f} ms a fetch")


if __name__ == "__main__":
    main()
