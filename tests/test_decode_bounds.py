"""Bounded memory and time per decode, through the real decoder (`consumer.decoding`, over `mmsent`'s):
the process-wide pixel budget, the deadline after which a decode is abandoned (its pixels still held until it
really ends), JPEGs drafted and every image shrunk to what the model needs, and the fetcher's view of all that
against a loopback image server."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from consumer.decoding import DECODE_MIN_SIDE, BoundedDecoder, PixelBudget, decode_side, process_budget
from consumer.fetch import ImageFetcher, image_decoder
from consumer.settings import Settings
from mmsent import ImageDecodeError, open_checked
from tests.imageserver import ImageServer, image

SIDE = 4000  # 16 MP: the default per-image limit


@cache
def huge_png() -> bytes:
    """16 MP that compress to a few KB: the worst case per byte downloaded."""
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@cache
def photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((width, height)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


class PeakBudget(PixelBudget):
    """The real budget, remembering the most pixels it ever held at once."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.peak = 0

    def acquire(self, pixels: int, timeout_s: float) -> bool:
        taken = super().acquire(pixels, timeout_s)
        self.peak = max(self.peak, self.in_use)
        return taken


def decoder(budget: PixelBudget, timeout_s: float = 30.0) -> BoundedDecoder:
    return BoundedDecoder(max_pixels=16_000_000, max_side=8_192, budget=budget, timeout_s=timeout_s)


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("mmsent_image_decode_failures_total", {"reason": reason}) or 0.0


def test_the_budget_makes_a_decode_wait_for_room() -> None:
    budget = PixelBudget(100)
    assert budget.acquire(60, 1.0)
    got_room = threading.Event()
    waiter = threading.Thread(target=lambda: budget.acquire(60, 10.0) and got_room.set())
    waiter.start()
    assert not got_room.wait(0.3)  # 60 + 60 > 100: it waits
    budget.release(60)
    assert got_room.wait(5)
    waiter.join()
    assert budget.in_use == 60
    assert not budget.acquire(50, 0.05)  # no room within the wait: False, nothing taken
    assert budget.in_use == 60
    with pytest.raises(ValueError):
        budget.acquire(101, 0.0)  # more than the whole budget can never fit


def test_a_batch_of_huge_images_decodes_within_the_budget() -> None:
    """32 PNGs of 16 MP decoded at once, as the image stage does: never more than the budget in flight."""
    budget = PeakBudget(3 * SIDE * SIDE)
    decode = decoder(budget)
    with ThreadPoolExecutor(32) as pool:
        images = list(pool.map(decode, [huge_png()] * 32))
    assert budget.peak <= budget.capacity and budget.peak >= SIDE * SIDE
    assert budget.in_use == 0
    # Each came back no larger than the model needs: box-averaged by 7 to a shorter side in [DECODE_MIN_SIDE, 2x),
    # the colour kept.
    assert {im.size for im in images} == {(572, 572)}
    assert images[0].mode == "RGB" and images[0].getpixel((10, 10)) == (200, 30, 30)


def test_an_image_larger_than_the_whole_budget_is_too_large() -> None:
    before = failures("too_large")
    with pytest.raises(ImageDecodeError) as caught:
        decoder(PixelBudget(SIDE * SIDE - 1))(huge_png())
    assert caught.value.reason == "too_large"
    assert failures("too_large") == before + 1


def test_a_decode_past_its_deadline_is_abandoned_but_keeps_its_pixels_until_it_ends() -> None:
    budget = PixelBudget(2 * SIDE * SIDE)
    before = failures("timeout")
    started = time.monotonic()
    with pytest.raises(ImageDecodeError) as caught:
        decoder(budget, timeout_s=0.001)(huge_png())  # a real 16 MP decode takes far longer than 1 ms
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 0.5  # the caller did not wait for the decode
    assert failures("timeout") == before + 1
    assert budget.in_use == SIDE * SIDE  # the abandoned decode still holds its pixels...
    deadline = time.monotonic() + 30
    while budget.in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert budget.in_use == 0  # ...until it really ends


def test_with_the_budget_held_a_decode_gives_up_as_busy() -> None:
    budget = PixelBudget(SIDE * SIDE)
    assert budget.acquire(1, 1.0)  # an abandoned decode, say, still holds a pixel
    before = failures("busy")
    with pytest.raises(ImageDecodeError) as caught:
        decoder(budget, timeout_s=0.01)(huge_png())  # waits 4 deadlines for room, then gives up
    assert caught.value.reason == "busy"
    assert failures("busy") == before + 1
    assert budget.in_use == 1


def test_a_jpeg_is_drafted_to_the_smallest_dct_scale_the_model_needs() -> None:
    im = open_checked(photo_jpeg(), max_pixels=16_000_000, max_side=8_192, min_side=DECODE_MIN_SIDE)
    # 4000x3000 -> 1/4 (the 1/8 scale would give 375 px < 512): 1000x750, 1/16 of the pixels to allocate
    assert im.size == (1000, 750)
    budget = PeakBudget(16_000_000)
    out = decoder(budget)(photo_jpeg())
    assert budget.peak == 1000 * 750  # the budget counts what is really allocated
    assert out.size == (1000, 750) and out.mode == "RGB"  # below 2 x 512 already: not resized again
    small = photo_jpeg(400, 300)  # already smaller than needed: untouched
    assert decoder(budget)(small).size == (400, 300)


@pytest.mark.parametrize(("size", "min_side", "expected"), [
    ((600, 800), 448, (600, 800)),  # every pixel, no resize (it cost 2 ms)
    ((600, 800), 224, (300, 400)),  # an MVSA photo for the default model: the DCT scale 1/2 is enough
    ((1200, 1600), 448, (600, 800)),
    ((4000, 3000), 448, (1000, 750)),  # 1/4 (1/8 would give 375 < 448)
    ((4000, 3000), 160, (250, 188)),  # 1/8 (500 x 375), the smallest DCT scale, then box-averaged by 2
])
def test_a_jpeg_comes_back_with_its_shorter_side_between_min_side_and_twice_it(
        size: tuple[int, int], min_side: int, expected: tuple[int, int]) -> None:
    out = BoundedDecoder(max_pixels=16_000_000, max_side=8_192, budget=PixelBudget(16_000_000), timeout_s=30.0,
                         min_side=min_side)(photo_jpeg(*size))
    assert out.size == expected and out.mode == "RGB"
    assert min(size) < min_side or min_side <= min(out.size) < 2 * min_side


def test_the_decode_side_is_what_each_model_preprocess_needs() -> None:
    from mmsent.imaging import ImagePreprocess
    from mmsent.presets import preset_config

    squash = preset_config("default").image.preprocess  # EfficientNet-Lite0: squashed to 224 x 224
    crop = ImagePreprocess(size=224, resize=256)  # the shorter side resized to 256, then cropped
    assert (squash.source_side, crop.source_side) == (224, 256)

    class Holding:  # what decode_side reads of a Scorer: its decode_side, set from its model's preprocess
        def __init__(self, preprocess: ImagePreprocess) -> None:
            self.decode_side = preprocess.source_side

    from mmsent import Scorer

    tiny = Scorer.load("tiny-random")
    assert decode_side(tiny) == 36  # its tiny CNN crops from a 36 px shorter side
    tiny.decode_side = 100
    assert decode_side(tiny) == 100  # the Scorer's own decode side is the one source of the rule
    assert decode_side(Holding(squash)) == 224
    assert decode_side(Holding(squash), Holding(crop)) == 256  # a shadow model's need counts too
    assert decode_side(object()) == DECODE_MIN_SIDE  # a scorer that does not say
    settings = Settings()
    decode = image_decoder(settings, min_side=decode_side(Holding(squash)))
    assert isinstance(decode, BoundedDecoder) and decode.min_side == 224
    assert image_decoder(settings).min_side == DECODE_MIN_SIDE  # type: ignore[union-attr]


def test_the_service_decoder_shares_one_budget_per_process() -> None:
    settings = Settings(decode_pixel_budget=12_345_678)
    first, second = image_decoder(settings), image_decoder(settings)
    assert isinstance(first, BoundedDecoder) and isinstance(second, BoundedDecoder)
    assert first.budget is second.budget is process_budget(12_345_678)
    assert first.timeout_s == settings.decode_timeout_s and first.max_pixels == 16_000_000


@pytest.mark.usefixtures("netguard")
def test_a_fetched_image_past_the_decode_deadline_is_unavailable(image_server: ImageServer) -> None:
    url = image_server.route("/huge.png", image(huge_png(), "image/png"))
    before = failures("timeout")

    async def fetch(settings: Settings) -> tuple[str, str, object]:
        async with ImageFetcher(settings, decode=image_decoder(settings)) as fetcher:
            result, decoded = await fetcher.fetch_image(url)
        return result.status, result.reason, decoded

    tight = Settings(fetch_allow_cidrs="127.0.0.1/32", fetch_retries=0, decode_timeout_s=0.001)
    assert asyncio.run(fetch(tight)) == ("unavailable", "timeout", None)
    assert failures("timeout") == before + 1
    status, _, decoded = asyncio.run(fetch(tight.model_copy(update={"decode_timeout_s": 30.0})))
    assert status == "ok" and isinstance(decoded, Image.Image) and decoded.size == (572, 572)  # 4000 px / 7
