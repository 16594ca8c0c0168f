"""ImageFetcher against real HTTP servers on loopback that record every connection and request.

Every test runs under `netguard`: an attempt to open a socket to anything but loopback (or to resolve a real
name) fails the test. Private, link-local and metadata addresses are exercised through fake DNS names that
point at them: the fetcher must refuse them before it connects, so no packet ever leaves the machine.
"""

from __future__ import annotations

import asyncio
import io
import resource
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from PIL import Image

from consumer.fetch import FetchResult, ImageFetcher, PinnedResolver, pinned, sniff_image_type
from consumer.netpolicy import Target
from consumer.settings import Settings
from tests.imageserver import (
    ImageServer,
    RecordingHandler,
    Responder,
    SelfSignedCert,
    body,
    drip,
    drop,
    endless,
    garbage,
    image,
    make_certificate,
    png_bomb,
    redirect,
    sample_image,
    sequence,
    slow,
    status,
)
from tests.netguard import NetGuard

pytestmark = pytest.mark.usefixtures("netguard")

T = TypeVar("T")
JPEG = sample_image("JPEG")


def settings(**overrides: Any) -> Settings:
    """Loopback 127.0.0.1 allowed (the test server lives there), short timeouts, no retries unless asked."""
    values: dict[str, Any] = {
        "fetch_allow_private": False,
        "fetch_allow_cidrs": "127.0.0.1/32",
        "fetch_connect_timeout_s": 1.0,
        "fetch_read_timeout_s": 1.0,
        "fetch_total_timeout_s": 5.0,
        "fetch_retries": 0,
        "fetch_max_redirects": 3,
        "fetch_negative_cache_s": 0,
    }
    values.update(overrides)
    return Settings(**values)


def with_fetcher(config: Settings, use: Callable[[ImageFetcher], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        async with ImageFetcher(config, retry_backoff_s=0.01, **kwargs) as fetcher:
            return await use(fetcher)

    return asyncio.run(main())


def fetch_all(urls: Sequence[str], config: Settings | None = None, **kwargs: Any) -> list[FetchResult]:
    async def use(fetcher: ImageFetcher) -> list[FetchResult]:
        return [await fetcher.fetch(url) for url in urls]

    return with_fetcher(config or settings(), use, **kwargs)


def fetch_one(url: str, config: Settings | None = None, **kwargs: Any) -> FetchResult:
    return fetch_all([url], config, **kwargs)[0]


def fetch_image(url: str, config: Settings | None = None) -> tuple[FetchResult, Image.Image | None]:
    return with_fetcher(config or settings(), lambda fetcher: fetcher.fetch_image(url))


# -- good images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"), ("BMP", "image/bmp")],
)
def test_good_images_are_fetched_and_decoded(image_server: ImageServer, fmt: str, mime: str) -> None:
    data = sample_image(fmt)
    # The server's Content-Type is deliberately wrong: only the bytes decide.
    url = image_server.route(f"/img.{fmt.lower()}", body(data, "application/octet-stream"))
    result, decoded = fetch_image(url)
    assert (result.status, result.reason, result.content_type) == ("ok", "ok", mime)
    assert result.data == data
    assert decoded is not None and decoded.mode == "RGB" and decoded.size == (64, 48)
    assert image_server.count() == 1
    request = image_server.requests[0]
    assert request.headers["Host"] == f"127.0.0.1:{image_server.port}"
    assert request.headers["Accept-Encoding"] == "identity"


def test_animated_gif_uses_its_first_frame(image_server: ImageServer) -> None:
    url = image_server.route("/anim.gif", image(sample_image("GIF"), "image/gif"))
    result, decoded = fetch_image(url)
    assert result.ok and decoded is not None
    red, green, _blue = decoded.getpixel((10, 30))  # type: ignore[misc]
    assert red > 150 and green < 100  # the first frame is red, the second green


def test_exif_orientation_is_applied(image_server: ImageServer) -> None:
    picture = Image.new("RGB", (64, 48), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    out = io.BytesIO()
    picture.save(out, format="JPEG", exif=exif)
    url = image_server.route("/rotated.jpg", image(out.getvalue()))
    result, decoded = fetch_image(url)
    assert result.ok and decoded is not None and decoded.size == (48, 64)


# -- hostile servers ---------------------------------------------------------------------------------------


def test_a_server_that_never_answers_hits_the_read_timeout(image_server: ImageServer) -> None:
    url = image_server.route("/hang", slow(30, image(JPEG)))
    started = time.monotonic()
    result = fetch_one(url, settings(fetch_read_timeout_s=0.3))
    assert (result.status, result.reason) == ("unavailable", "timeout")
    assert time.monotonic() - started < 2


def test_a_server_that_drips_hits_the_total_deadline(image_server: ImageServer) -> None:
    # Each byte arrives well within the read timeout; only the total deadline stops this.
    url = image_server.route("/drip", drip(JPEG, interval_s=0.05))
    started = time.monotonic()
    result = fetch_one(url, settings(fetch_read_timeout_s=1.0, fetch_total_timeout_s=1.0))
    assert (result.status, result.reason) == ("unavailable", "timeout")
    assert 0.9 < time.monotonic() - started < 3


def test_timeouts_are_retried_within_the_total_deadline(image_server: ImageServer) -> None:
    url = image_server.route("/hang", slow(30, image(JPEG)))
    result = fetch_one(url, settings(fetch_read_timeout_s=0.2, fetch_retries=2))
    assert result.reason == "timeout"
    assert image_server.count("/hang") == 3


def test_an_endless_body_is_cut_at_the_limit(image_server: ImageServer) -> None:
    url = image_server.route("/endless", endless())
    started = time.monotonic()
    result = fetch_one(url, settings(fetch_max_bytes=64 * 1024))
    assert (result.status, result.reason) == ("unavailable", "too_large")
    assert time.monotonic() - started < 2
    # The server could only push what the socket buffers held before we hung up.
    assert image_server.bytes_sent < 64 * 1024 * 1024


def test_a_declared_length_over_the_limit_is_refused_before_reading(image_server: ImageServer) -> None:
    url = image_server.route("/big", body(JPEG + b"\x00" * 200_000, "image/jpeg"))
    assert fetch_one(url, settings(fetch_max_bytes=64 * 1024)).reason == "too_large"


@pytest.mark.parametrize(
    ("payload", "content_type", "reason"),
    [
        (b"just some text, honestly, served as a photo" * 10, "image/jpeg", "not_an_image"),
        (b"<html><body><img src=x></body></html>", "image/png", "not_an_image"),
        (b'{"error": "not found"}', "image/webp", "not_an_image"),
        (b"", "image/jpeg", "empty_body"),
        (b"GIF8", "image/gif", "not_an_image"),  # too short to be anything
    ],
)
def test_content_is_judged_by_magic_bytes(
    image_server: ImageServer, payload: bytes, content_type: str, reason: str
) -> None:
    url = image_server.route("/fake", body(payload, content_type))
    assert fetch_one(url) == FetchResult("unavailable", None, reason)


def test_compressed_responses_are_refused(image_server: ImageServer) -> None:
    url = image_server.route("/gz", body(JPEG, "image/jpeg", headers={"Content-Encoding": "gzip"}))
    assert fetch_one(url).reason == "content_encoding"


def test_a_cookie_one_server_sets_is_never_sent_back(image_server: ImageServer, netguard: NetGuard) -> None:
    """A stranger's server must not plant state that travels with later fetches (to it or to another host)."""
    netguard.add_host("other.test", "127.0.0.1")
    first = image_server.route("/a.jpg", body(JPEG, "image/jpeg", headers={"Set-Cookie": "track=1; Path=/"}))
    image_server.route("/b.jpg", image(JPEG))
    results = fetch_all([first, image_server.url("/b.jpg"), f"http://other.test:{image_server.port}/b.jpg"])
    assert [result.ok for result in results] == [True, True, True]
    assert [r.headers.get("Cookie") for r in image_server.requests] == [None, None, None]


def test_proxy_settings_in_the_environment_are_ignored(image_server: ImageServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned, checked address is the only way out: a proxy named in the environment (here a loopback port
    nobody listens on, which would fail every fetch) is never used."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    url = image_server.route("/a.jpg", image(JPEG))
    assert fetch_one(url).ok
    assert [r.path for r in image_server.requests] == ["/a.jpg"]


def test_a_decompression_bomb_is_refused_without_allocating_it(image_server: ImageServer) -> None:
    bomb = png_bomb(20_000, 20_000)  # 1.2 GB of RGB pixels declared, a few KB sent
    assert len(bomb) < 10_000
    good = image_server.route("/good.png", image(sample_image("PNG"), "image/png"))
    url = image_server.route("/bomb.png", image(bomb, "image/png"))

    async def use(fetcher: ImageFetcher) -> tuple[FetchResult, Image.Image | None, int]:
        await fetcher.fetch_image(good)  # import and warm the decoder first, so only the bomb is measured
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result, decoded = await fetcher.fetch_image(url)
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return result, decoded, grown_kb

    result, decoded, grown_kb = with_fetcher(settings(), use)
    assert result.status == "unavailable" and result.reason == "too_large"
    assert decoded is None
    assert grown_kb < 100 * 1024  # far below the 1.2 GB a decode would need


def test_an_image_over_the_maximum_side_is_refused(image_server: ImageServer) -> None:
    url = image_server.route("/wide.png", image(sample_image("PNG", size=(3000, 2)), "image/png"))
    result, decoded = fetch_image(url, settings(fetch_max_side=2048))
    assert result.status == "unavailable" and result.reason == "too_large" and decoded is None


def test_an_undecodable_image_is_unavailable_and_not_fetched_again(image_server: ImageServer) -> None:
    url = image_server.route("/broken.jpg", image(b"\xff\xd8\xff\xe0" + b"\x13" * 500))

    async def use(fetcher: ImageFetcher) -> list[tuple[FetchResult, Image.Image | None]]:
        return [await fetcher.fetch_image(url), await fetcher.fetch_image(url)]

    results = with_fetcher(settings(fetch_negative_cache_s=60), use)
    assert [(r.status, d) for r, d in results] == [("unavailable", None)] * 2
    assert results[0][0].reason in {"corrupt", "truncated"} and results[1][0] == results[0][0]
    assert image_server.count("/broken.jpg") == 1


# -- status codes, retries, negative cache, sharing ------------------------------------------------------


def test_5xx_is_retried_then_reported(image_server: ImageServer) -> None:
    url = image_server.route("/err", status(503))
    assert fetch_one(url, settings(fetch_retries=2)) == FetchResult("unavailable", None, "http_5xx")
    assert image_server.count("/err") == 3


def test_a_transient_5xx_recovers(image_server: ImageServer) -> None:
    url = image_server.route("/flaky", sequence(status(500), status(502), image(JPEG)))
    result = fetch_one(url, settings(fetch_retries=2))
    assert result.ok and result.data == JPEG
    assert image_server.count("/flaky") == 3


@pytest.mark.parametrize("code", [400, 403, 404, 410, 451])
def test_4xx_is_not_retried(image_server: ImageServer, code: int) -> None:
    url = image_server.route("/gone", status(code))
    assert fetch_one(url, settings(fetch_retries=3)) == FetchResult("unavailable", None, "http_4xx")
    assert image_server.count("/gone") == 1


@pytest.mark.parametrize(("responder", "name", "requests"), [(drop(), "drop", 4), (garbage(), "garbage", 2)])
def test_broken_connections_are_retried_and_reported(
    image_server: ImageServer, responder: Responder, name: str, requests: int
) -> None:
    """One retry (`fetch_retries=1`): two attempts. A connection closed before any response is sent again at once
    by aiohttp within an attempt (its guard against a kept-alive connection the server has just closed), so a
    server that always drops is asked twice per attempt; a garbled response is not asked again within one."""
    url = image_server.route(f"/{name}", responder)
    result = fetch_one(url, settings(fetch_retries=1))
    assert result.status == "unavailable" and result.reason in {"connect_error", "read_error"}
    assert image_server.count(f"/{name}") == requests


@pytest.mark.parametrize("headers", [
    b"X-Pad: " + b"a" * 100_000 + b"\r\n",  # one header line of 100 KB
    b"".join(b"X-Pad-%d: a\r\n" % k for k in range(20_000)),  # 20,000 headers
], ids=["long-line", "many-headers"])
def test_a_response_with_oversized_headers_is_refused(image_server: ImageServer, headers: bytes) -> None:
    """The client's parser limits hold (aiohttp: 8,190 bytes a line, 128 headers): the fetch ends unavailable, its
    body never read, instead of the headers being kept in memory."""
    response = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + headers + b"\r\n" + JPEG
    url = image_server.route("/pad", garbage(response))
    assert fetch_one(url) == FetchResult("unavailable", None, "connect_error")


def test_connection_refused_is_unavailable() -> None:
    with ImageServer(("127.0.0.1",)) as server:
        url = server.url("/a.jpg")
    result = fetch_one(url, settings(fetch_retries=1))
    assert (result.status, result.reason) == ("unavailable", "connect_error")


def test_a_dead_url_is_remembered_for_a_while(image_server: ImageServer) -> None:
    url = image_server.route("/missing", status(404))
    assert [r.reason for r in fetch_all([url] * 5, settings(fetch_negative_cache_s=60))] == ["http_4xx"] * 5
    assert image_server.count("/missing") == 1
    fetch_all([url] * 2, settings(fetch_negative_cache_s=0))
    assert image_server.count("/missing") == 3


def test_concurrent_fetches_of_one_url_share_one_download(image_server: ImageServer) -> None:
    url = image_server.route("/viral.jpg", slow(0.3, image(JPEG)))

    async def use(fetcher: ImageFetcher) -> list[FetchResult]:
        return list(await asyncio.gather(*(fetcher.fetch(url) for _ in range(20))))

    results = with_fetcher(settings(), use)
    assert all(r.ok and r.data == JPEG for r in results)
    assert image_server.count("/viral.jpg") == 1


def test_per_host_concurrency_is_limited(image_server: ImageServer) -> None:
    lock = threading.Lock()
    active = [0, 0]  # now, most

    def counting(handler: RecordingHandler) -> None:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            slow(0.15, image(JPEG))(handler)
        finally:
            with lock:
                active[0] -= 1

    urls = [image_server.route(f"/c{i}.jpg", counting) for i in range(8)]

    async def use(fetcher: ImageFetcher) -> list[FetchResult]:
        return list(await asyncio.gather(*(fetcher.fetch(u) for u in urls)))

    results = with_fetcher(settings(fetch_per_host_concurrency=2), use)
    assert all(r.ok for r in results)
    assert active[1] == 2


def test_fetch_never_raises_on_nonsense() -> None:
    for url in ["", "not a url", "http://", "javascript:alert(1)", "http://[::1", "http://\x00/", "h" * 10_000]:
        result = fetch_one(url)
        assert result.status == "blocked" and result.data is None, url


# -- redirects -----------------------------------------------------------------------------------------------


def test_redirects_within_the_limit_are_followed(image_server: ImageServer) -> None:
    image_server.route("/a.jpg", image(JPEG))
    image_server.route("/r2", redirect("/a.jpg", 301))  # relative
    image_server.route("/r1", redirect(image_server.url("/r2"), 307))
    url = image_server.route("/r0", redirect(image_server.url("/r1"), 302))
    result = fetch_one(url, settings(fetch_max_redirects=3))
    assert result.ok and result.data == JPEG
    assert [r.path for r in image_server.requests] == ["/r0", "/r1", "/r2", "/a.jpg"]


def test_a_redirect_chain_past_the_limit_stops(image_server: ImageServer) -> None:
    image_server.route("/a.jpg", image(JPEG))
    for hop in range(6):
        image_server.route(f"/r{hop}", redirect(f"/r{hop + 1}" if hop < 5 else "/a.jpg"))
    result = fetch_one(image_server.url("/r0"), settings(fetch_max_redirects=3))
    assert (result.status, result.reason) == ("unavailable", "too_many_redirects")
    assert [r.path for r in image_server.requests] == ["/r0", "/r1", "/r2", "/r3"]


def test_a_redirect_loop_stops(image_server: ImageServer) -> None:
    url = image_server.route("/loop", redirect("/loop"))
    assert fetch_one(url, settings(fetch_max_redirects=5)).reason == "too_many_redirects"
    assert image_server.count("/loop") == 6


def test_a_redirect_to_another_scheme_is_blocked(image_server: ImageServer) -> None:
    url = image_server.route("/to-file", redirect("file:///etc/passwd"))
    assert fetch_one(url) == FetchResult("blocked", None, "scheme")


def test_a_redirect_without_location_is_unavailable(image_server: ImageServer) -> None:
    url = image_server.route("/nowhere", status(302))
    assert fetch_one(url).reason == "redirect_without_location"


# -- SSRF: loopback in every spelling, with servers listening there ------------------------------------------


def loopback_spellings(port: int) -> list[str]:
    p = port
    return [
        f"http://127.0.0.1:{p}/a.jpg",
        f"http://127.1:{p}/a.jpg",
        f"http://127.0.1:{p}/a.jpg",
        f"http://2130706433:{p}/a.jpg",
        f"http://0x7f000001:{p}/a.jpg",
        f"http://0x7F.0.0.1:{p}/a.jpg",
        f"http://0177.0.0.1:{p}/a.jpg",
        f"http://0177.1:{p}/a.jpg",
        f"http://017700000001:{p}/a.jpg",
        f"http://127.000.000.001:{p}/a.jpg",
        f"http://127.0.0.1.:{p}/a.jpg",
        f"http://127.0.0.2:{p}/a.jpg",
        f"http://①②⑦.0.0.1:{p}/a.jpg",
        f"http://[::1]:{p}/a.jpg",
        f"http://[0:0:0:0:0:0:0:1]:{p}/a.jpg",
        f"http://[::ffff:127.0.0.1]:{p}/a.jpg",
        f"http://[::ffff:7f00:1]:{p}/a.jpg",
        f"http://[::127.0.0.1]:{p}/a.jpg",
        f"http://[64:ff9b::7f00:1]:{p}/a.jpg",
        f"http://0:{p}/a.jpg",
        f"http://0.0.0.0:{p}/a.jpg",
        f"http://[::]:{p}/a.jpg",
        f"http://localhost:{p}/a.jpg",
        f"http://LOCALHOST.:{p}/a.jpg",
        f"http://loop.test:{p}/a.jpg",  # a name whose DNS answer is loopback
        f"http://mixed.test:{p}/a.jpg",  # one public answer and one loopback answer
        f"http://a@127.0.0.1:{p}/a.jpg",
        f"http://user:pw@127.0.0.1:{p}/a.jpg",
        f"http://example.com@127.0.0.1:{p}/a.jpg",
        f"http://127.0.0.1:{p}\\@example.com/a.jpg",
        f"https://127.0.0.1:{p}/a.jpg",
    ]


def test_every_loopback_spelling_is_blocked_and_no_server_hears_of_it(
    loopback_servers: ImageServer, netguard: NetGuard
) -> None:
    netguard.add_host("loop.test", "127.0.0.1")
    netguard.add_host("mixed.test", "93.184.216.34", "127.0.0.1")
    loopback_servers.route("/a.jpg", image(JPEG))
    urls = loopback_spellings(loopback_servers.port)
    assert len(urls) >= 15
    default = settings(fetch_allow_cidrs="", fetch_retries=2)

    results = fetch_all(urls, default)

    assert [(url, r.status) for url, r in zip(urls, results, strict=True)] == [(url, "blocked") for url in urls]
    assert loopback_servers.requests == []
    assert loopback_servers.connections == []
    assert netguard.connects == []


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/a.jpg",
        "http://[::1]:{port}/a.jpg",
        "http://2130706433:{port}/a.jpg",
        "http://[::ffff:127.0.0.2]:{port}/a.jpg",
        "http://rebind.test:{port}/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.test/computeMetadata/v1/",
        "http://10.0.0.1/a.jpg",
    ],
)
def test_a_redirect_from_an_allow_listed_address_to_a_refused_one_is_blocked(
    loopback_servers: ImageServer, netguard: NetGuard, target: str
) -> None:
    netguard.add_host("rebind.test", "127.0.0.2")
    netguard.add_host("metadata.test", "169.254.169.254")
    loopback_servers.route("/a.jpg", image(JPEG))
    start = loopback_servers.route("/start", redirect(target.format(port=loopback_servers.port)))

    result = fetch_one(start, settings(fetch_allow_cidrs="127.0.0.1/32"))

    assert result.status == "blocked"
    # Only the allow-listed first hop was ever reached.
    assert [(r.local[0], r.path) for r in loopback_servers.requests] == [("127.0.0.1", "/start")]
    assert {host for host, _port in netguard.connects} == {"127.0.0.1"}


# -- SSRF: private, link-local, metadata and friends, at the policy level (fake DNS, no packets) -----------


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        (["10.0.0.5"], "private"),
        (["172.16.8.1"], "private"),
        (["192.168.0.10"], "private"),
        (["100.64.0.1"], "shared"),
        (["169.254.169.254"], "link_local"),
        (["fe80::1"], "link_local"),
        (["fd00:ec2::254"], "private"),
        (["::ffff:169.254.169.254"], "link_local"),
        (["::ffff:10.0.0.1"], "private"),
        (["64:ff9b::a9fe:a9fe"], "link_local"),
        (["2002:c0a8:1::1"], "private"),
        (["224.0.0.251"], "multicast"),
        (["0.0.0.0"], "unspecified"),
        (["255.255.255.255"], "reserved"),
        (["93.184.216.34", "10.0.0.1"], "private"),  # one bad answer is enough
        (["2606:4700::6810:84e5", "fe80::1"], "link_local"),
    ],
)
def test_names_resolving_to_internal_addresses_are_blocked_before_connecting(
    netguard: NetGuard, addresses: list[str], reason: str
) -> None:
    netguard.add_host("images.example", *addresses)
    result = fetch_one("http://images.example/cat.jpg", settings(fetch_allow_cidrs=""))
    assert result == FetchResult("blocked", None, reason)
    assert netguard.lookups == ["images.example"]
    assert netguard.connects == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/latest/",
        "http://10.0.0.1/",
        "http://0xa9fea9fe/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://192.168.1.1:8080/",
    ],
)
def test_internal_literals_are_blocked_without_any_lookup(netguard: NetGuard, url: str) -> None:
    assert fetch_one(url, settings(fetch_allow_cidrs="")).status == "blocked"
    assert netguard.lookups == [] and netguard.connects == []


def test_an_unresolvable_name_is_unavailable(netguard: NetGuard) -> None:
    netguard.add_host("nowhere.test")  # no addresses: the fake resolver says "no such name"
    assert fetch_one("http://nowhere.test/a.jpg").reason == "dns_error"
    assert netguard.connects == []


# -- connecting to the address that was checked ---------------------------------------------------------------


def test_a_name_is_resolved_once_and_the_checked_address_is_used(image_server: ImageServer, netguard: NetGuard) -> None:
    netguard.add_host("images.test", "127.0.0.1")
    image_server.route("/a.jpg", image(JPEG))
    result = fetch_one(f"http://images.test:{image_server.port}/a.jpg")
    assert result.ok
    assert netguard.lookups == ["images.test"]  # no second lookup by the HTTP client
    assert netguard.connects == [("127.0.0.1", image_server.port)]
    assert image_server.requests[0].headers["Host"] == f"images.test:{image_server.port}"


def test_dns_rebinding_cannot_change_the_address(image_server: ImageServer) -> None:
    """The first answer is checked and used; later answers (rebound to a private address) never are."""
    asked: list[str] = []

    async def rebinding_resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"] if len(asked) in (1, 2) else ["10.0.0.1"]

    image_server.route("/a.jpg", image(JPEG))
    image_server.route("/hop", redirect("/a.jpg"))

    async def use(fetcher: ImageFetcher) -> list[FetchResult]:
        one_hop = await fetcher.fetch(f"http://rebind.test:{image_server.port}/a.jpg")
        assert asked == ["rebind.test"]  # one lookup, by us; the HTTP client does none
        # A redirect is a new hop, resolved and checked again: the rebound answer is refused even though a
        # kept-alive connection to the same host is sitting in the pool.
        two_hops = await fetcher.fetch(f"http://rebind.test:{image_server.port}/hop")
        return [one_hop, two_hops]

    one_hop, two_hops = with_fetcher(settings(), use, resolver=rebinding_resolver)
    assert one_hop.ok
    assert two_hops == FetchResult("blocked", None, "private")
    assert asked == ["rebind.test"] * 3
    assert [r.path for r in image_server.requests] == ["/a.jpg", "/hop"]


def test_the_resolver_answers_only_for_the_pinned_host() -> None:
    """The HTTP client's only resolver: with no pin, another host or another port it refuses (so aiohttp never
    connects); for the pinned host, exactly the checked addresses, with the URL's name kept for TLS."""
    target = Target(url="http://images.test:8080/a.jpg", scheme="http", host="images.test", port=8080, ip=None)

    async def answers() -> tuple[list[str], list[dict[str, object]]]:
        refused = []
        resolver = PinnedResolver()
        for host, port in [("images.test", 8080), ("127.0.0.1", 8080)]:
            try:
                await resolver.resolve(host, port)
            except OSError:
                refused.append(f"{host}:{port} unpinned")
        with pinned(target, ["127.0.0.1", "::1"]):
            for host, port in [("other.test", 8080), ("images.test", 80)]:
                try:
                    await resolver.resolve(host, port)
                except OSError:
                    refused.append(f"{host}:{port}")
            found = await resolver.resolve("images.test", 8080)
        return refused, [dict(answer) for answer in found]

    refused, found = asyncio.run(answers())
    assert refused == ["images.test:8080 unpinned", "127.0.0.1:8080 unpinned", "other.test:8080", "images.test:80"]
    assert [(a["hostname"], a["host"], a["port"], a["family"]) for a in found] == [
        ("images.test", "127.0.0.1", 8080, socket.AF_INET), ("images.test", "::1", 8080, socket.AF_INET6)]


def test_sniffing() -> None:
    assert sniff_image_type(JPEG) == "image/jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00AVI LIST") is None
    assert sniff_image_type(b"<svg xmlns=") is None
    assert sniff_image_type(b"") is None


# -- https: the pinned address, with the URL's name for SNI and certificate checks -------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> SelfSignedCert:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    return make_certificate(str(tmp_path_factory.mktemp("tls")), ["images.test"])


@pytest.fixture
def tls_server(certificate: SelfSignedCert) -> Iterator[ImageServer]:
    with ImageServer(("127.0.0.1",), tls=certificate.server_context()) as server:
        server.route("/a.jpg", image(JPEG))
        yield server


def test_https_to_a_pinned_address_checks_the_certificate_against_the_name(
    tls_server: ImageServer, certificate: SelfSignedCert, netguard: NetGuard
) -> None:
    netguard.add_host("images.test", "127.0.0.1")
    url = f"https://images.test:{tls_server.port}/a.jpg"
    result = fetch_one(url, ssl_context=certificate.client_context())
    assert result.ok and result.data == JPEG
    assert netguard.connects == [("127.0.0.1", tls_server.port)]
    assert tls_server.requests[0].headers["Host"] == f"images.test:{tls_server.port}"


def test_https_with_a_certificate_for_another_name_fails(
    tls_server: ImageServer, certificate: SelfSignedCert, netguard: NetGuard
) -> None:
    netguard.add_host("other.test", "127.0.0.1")
    result = fetch_one(f"https://other.test:{tls_server.port}/a.jpg", ssl_context=certificate.client_context())
    assert (result.status, result.reason) == ("unavailable", "connect_error")
    assert tls_server.requests == []


def test_https_with_an_untrusted_certificate_fails(tls_server: ImageServer, netguard: NetGuard) -> None:
    netguard.add_host("images.test", "127.0.0.1")
    result = fetch_one(f"https://images.test:{tls_server.port}/a.jpg")  # the public roots, not our test CA
    assert (result.status, result.reason) == ("unavailable", "connect_error")
    assert tls_server.requests == []
