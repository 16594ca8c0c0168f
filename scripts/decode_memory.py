"""Peak memory (RSS) of the image stage's worst batch: N PNGs at the per-image pixel limit that compress to a few KB,
served by a loopback image server and had through the real fetcher and decoder, all at once as the ImageStage has
them, the decoded images kept until the end as a batch keeps them for the model.

    .venv/bin/python scripts/decode_memory.py [--images 32] [--budget PIXELS] [--no-shrink]

Run it once per setting (each run is a fresh process, so its peak RSS is the batch's): `--budget 0` is no budget
(one larger than the whole batch), `--no-shrink` keeps every decoded pixel (the decoder before issue 25). The
default executor gets 32 threads, as asyncio gives a node with 28 cores or more, so that nothing but the budget
limits how many decodes run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from consumer.decoding import DECODE_MIN_SIDE, BoundedDecoder, PixelBudget
from consumer.fetch import ImageFetcher
from consumer.settings import Settings
from tests.imageserver import ImageServer, image


def worst_png(pixels: int) -> bytes:
    side = int(pixels**0.5)
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 30, 30, 128)).save(buf, "PNG")  # alpha: the costliest conversion
    return buf.getvalue()


async def batch(urls: list[str], settings: Settings, decoder: BoundedDecoder) -> list[object]:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))
    async with ImageFetcher(settings, decode=decoder) as fetcher:
        return list(await asyncio.gather(*(fetcher.fetch_image(url) for url in urls)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--budget", type=int, default=None, help="pixels; default MMSENT_DECODE_PIXEL_BUDGET's")
    parser.add_argument("--no-shrink", action="store_true")
    args = parser.parse_args()
    settings = Settings(fetch_allow_cidrs="127.0.0.1/32", fetch_retries=0, decode_timeout_s=120)
    png = worst_png(settings.fetch_max_pixels)
    budget = args.budget if args.budget is not None else settings.decode_pixel_budget
    capacity = budget or args.images * settings.fetch_max_pixels
    decoder = BoundedDecoder(max_pixels=settings.fetch_max_pixels, max_side=settings.fetch_max_side,
                             budget=PixelBudget(capacity), timeout_s=settings.decode_timeout_s,
                             min_side=None if args.no_shrink else DECODE_MIN_SIDE)
    with ImageServer() as server:
        urls = [server.route(f"/worst{k}.png", image(png, "image/png")) for k in range(args.images)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.monotonic()
        results = asyncio.run(batch(urls, settings, decoder))
        seconds = time.monotonic() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "images": args.images, "png_bytes": len(png), "pixels_each": Image.open(io.BytesIO(png)).size,
        "budget_pixels": budget or "none", "shrink": not args.no_shrink,
        "ok": sum(1 for result, _ in results if result.ok),  # type: ignore[attr-defined]
        "seconds": round(seconds, 2), "rss_before_mib": before // 1024, "peak_rss_mib": peak_kib // 1024,
    }))


if __name__ == "__main__":
    main()
