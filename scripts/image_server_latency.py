"""How long the bench's loopback image server takes to serve a batch's photos, with Nagle's algorithm on and off.

The consumer fetches a batch's new photos at once, 8 at a time per host (`MMSENT_FETCH_PER_HOST_CONCURRENCY`) over
kept-alive connections; this does the same with httpx against `tooling.localimages.LoopbackImageServer`, idle, and
prints the median time for a batch of 22 photos (the bench's 32 posts less its ~30% repeats), in alternating rounds:

    .venv/bin/python scripts/image_server_latency.py [--rounds 3] [--batches 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from mmsent.benchmarks.host import sample_photos
from tooling.bench import photo_server
from tooling.localimages import LoopbackImageServer

PHOTOS_PER_BATCH = 22
PER_HOST = 8


async def median_batch_s(server: LoopbackImageServer, n_photos: int, batches: int) -> float:
    per_host = asyncio.Semaphore(PER_HOST)

    async def one(client: httpx.AsyncClient, index: int, batch: int) -> None:
        async with per_host:
            response = await client.get(f"{server.base}/p{index % n_photos}.jpg?batch={batch}")
            response.raise_for_status()

    times = []
    async with httpx.AsyncClient() as client:  # new connections, so the server's current setting applies
        for batch in range(batches):
            started = time.monotonic()
            await asyncio.gather(*(one(client, i, batch) for i in range(PHOTOS_PER_BATCH)))
            times.append(time.monotonic() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    photos, source = sample_photos(64)  # MVSA's where ../shared/data has them, else generated ones
    print(source)
    with photo_server(photos) as server:
        handler = server.handler
        for _ in range(args.rounds):
            for nodelay in (False, True):
                handler.disable_nagle_algorithm = nodelay
                seconds = asyncio.run(median_batch_s(server, len(photos), args.batches))
                print(f"{'TCP_NODELAY' if nodelay else 'Nagle on   '}  {PHOTOS_PER_BATCH} photos, {PER_HOST} at a "
                      f"time: median {1000 * seconds:.1f} ms a batch")
        handler.disable_nagle_algorithm = True


if __name__ == "__main__":
    main()
