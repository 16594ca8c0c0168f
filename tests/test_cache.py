"""ImageCache against a real `redis-server` this module starts on a free loopback port (and stops, and freezes).

The end-to-end tests run a small version of the consumer's image path: embedding from the cache, else image
bytes from the cache, else a download from the recording image server, then a CNN pass, counted by a fake
encoder. They show a repost costs no request and no CNN pass, and that a Redis outage costs nothing but hits.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client import REGISTRY

from consumer.batcher import Batch, WorkItem
from consumer.cache import (
    CircuitBreaker,
    CorruptValue,
    ImageCache,
    Seal,
    decode_embedding,
    decode_image_value,
    encode_embedding,
    encode_image,
)
from consumer.fetch import FetchResult, ImageFetcher, image_decoder
from consumer.metrics import Metrics
from consumer.netpolicy import AddressPolicy, Refused, normalise_url
from consumer.offsets import PartitionState
from consumer.settings import Settings
from consumer.stages import ImageStage
from schemas.models import ImageStatus, PostEvent
from tests.imageserver import ImageServer, image, sample_image

pytestmark = [pytest.mark.redis, pytest.mark.usefixtures("netguard")]

ENCODER = "test-encoder@1"
KEY = "mmsent:emb:v2:test"
JPEG = sample_image("JPEG")
PNG = sample_image("PNG")


# -- a Redis of our own -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`redis-server` on 127.0.0.1, no persistence; stop/start (same port) and pause/resume (SIGSTOP)."""

    def __init__(self, directory: Path, password: str | None = None, tls: Tls | None = None) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = _free_port()
        self.directory = directory
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def url_with(self, password: str | None = None, ca: Path | None = None) -> str:
        """The URL a client uses: `rediss://` with the CA it trusts when the server speaks TLS."""
        auth = f":{password}@" if password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={ca or self.tls.ca}"

    @property
    def url(self) -> str:
        return self.url_with(self.password)

    def start(self) -> None:
        listen = ["--port", str(self.port)]
        if self.tls is not None:  # TLS only: the plain port closed
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                      "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                      "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            [self.binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=0.2)


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, name: str = "test") -> Tls:
    """A CA of this test's own and a certificate it signs for 127.0.0.1 (the `cryptography` package)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def subject(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(subject(f"{name} CA")).issuer_name(subject(f"{name} CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(subject("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = Tls(directory / f"{name}-ca.pem", directory / f"{name}-cert.pem", directory / f"{name}-key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the envelope (no Redis) ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8,), (1280,), (2, 3, 4), ()])
def test_embeddings_round_trip(dtype: Any, shape: tuple[int, ...]) -> None:
    embedding = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    decoded, size = decode_embedding(encode_embedding(embedding, ENCODER, KEY, 1234), ENCODER, KEY)
    assert decoded.dtype == embedding.dtype and decoded.shape == embedding.shape and size == 1234
    np.testing.assert_array_equal(decoded, embedding)
    assert decoded.flags.writeable


def test_big_endian_embeddings_are_stored_little_endian() -> None:
    embedding = np.arange(4, dtype=">f4")
    decoded, _ = decode_embedding(encode_embedding(embedding, ENCODER, KEY), ENCODER, KEY)
    np.testing.assert_array_equal(decoded, embedding)


def test_non_float_embeddings_are_refused() -> None:
    for bad in (np.arange(3), np.array(["a"]), np.array([1 + 2j])):
        with pytest.raises(ValueError):
            encode_embedding(bad, ENCODER, KEY)


def test_damaged_or_foreign_values_are_rejected() -> None:
    blob = encode_embedding(np.ones(16, dtype=np.float32), ENCODER, KEY)
    flipped = bytearray(blob)
    flipped[30] ^= 0x01
    for bad in (
        b"",
        b"garbage",
        blob[:-1],
        blob[:20],
        bytes(flipped),
        b"XXXX" + blob[4:],
        encode_image(JPEG, KEY),  # an image where an embedding belongs
        JPEG,
        np.ones(16, dtype=np.float32).tobytes(),
    ):
        with pytest.raises(CorruptValue):
            decode_embedding(bad, ENCODER, KEY)
    with pytest.raises(CorruptValue):
        decode_embedding(blob, "another-encoder@2", KEY)
    with pytest.raises(CorruptValue):
        decode_image_value(blob, KEY)
    with pytest.raises(CorruptValue):
        decode_image_value(encode_image(b"<html>not an image</html>", KEY), KEY)
    assert decode_image_value(encode_image(JPEG, KEY), KEY) == JPEG


def test_an_entry_is_bound_to_its_key_and_its_seal() -> None:
    other_key = KEY + "x"
    with pytest.raises(CorruptValue, match="another key"):
        decode_image_value(encode_image(JPEG, other_key), KEY)
    with pytest.raises(CorruptValue, match="another key"):
        decode_embedding(encode_embedding(np.ones(4, np.float32), ENCODER, other_key), ENCODER, KEY)
    secret, another = Seal(b"s3cret"), Seal(b"another")
    assert decode_image_value(encode_image(JPEG, KEY, secret), KEY, secret) == JPEG
    for written, read in ((Seal(), secret), (secret, Seal()), (another, secret)):
        with pytest.raises(CorruptValue):
            decode_image_value(encode_image(JPEG, KEY, written), KEY, read)
    # The old envelope (version 1) reads as foreign.
    blob = bytearray(encode_image(JPEG, KEY))
    blob[4] = 1
    with pytest.raises(CorruptValue, match="foreign"):
        decode_image_value(bytes(blob), KEY)


def test_non_finite_embeddings_are_refused() -> None:
    for bad in (np.array([1.0, np.nan], np.float32), np.array([np.inf], np.float16)):
        with pytest.raises(CorruptValue, match="non-finite"):
            decode_embedding(encode_embedding(bad, ENCODER, KEY), ENCODER, KEY)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("HTTP://Example.COM/a.jpg", "http://example.com/a.jpg"),
        ("http://example.com:80/a.jpg", "http://example.com/a.jpg"),
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg"),
        ("http://example.com/a.jpg#frag", "http://example.com/a.jpg"),
        ("http://example.com", "http://example.com/"),
        ("http://[2001:DB8::1]:80/x", "http://[2001:db8::1]/x"),
    ],
)
def test_equivalent_urls_share_a_key(a: str, b: str) -> None:
    assert normalise_url(a) == normalise_url(b) is not None
    cache = ImageCache(None)
    assert cache.image_key(a) == cache.image_key(b)
    assert cache.embedding_key(a, ENCODER) == cache.embedding_key(b, ENCODER)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://example.com/a.jpg", "https://example.com/a.jpg"),
        ("http://example.com/a.jpg", "http://example.com:8080/a.jpg"),
        ("http://example.com/A.jpg", "http://example.com/a.jpg"),  # paths are case-sensitive
        ("http://example.com/a.jpg?x=1", "http://example.com/a.jpg?x=2"),
    ],
)
def test_different_urls_get_different_keys(a: str, b: str) -> None:
    assert ImageCache(None).image_key(a) != ImageCache(None).image_key(b)


@pytest.mark.parametrize("url", ["http://x.test/a\tb.jpg", "http://x.test/a.jpg\n", "\rhttp://x.test/a.jpg",
                                 "http://x.test/a b.jpg", "ftp://x.test/a.jpg", "http://u:p@x.test/a.jpg"])
def test_urls_the_policy_cannot_parse_have_no_key(url: str) -> None:
    # urlsplit would drop the tab or newline and give "http://x.test/ab.jpg" its key; the policy refuses instead.
    assert normalise_url(url) is None
    assert ImageCache(None).image_key(url) is None and ImageCache(None).embedding_key(url, ENCODER) is None


def test_embedding_keys_depend_on_the_encoder() -> None:
    cache = ImageCache(None)
    assert cache.embedding_key("http://x.test/a", "enc@1") != cache.embedding_key("http://x.test/a", "enc@2")


def test_breaker_backs_off_then_probes_once() -> None:
    now = [0.0]
    breaker = CircuitBreaker(5.0, clock=lambda: now[0])
    assert breaker.allow()
    assert breaker.record_failure() is True  # the start of an outage: warn
    assert breaker.record_failure() is False  # still the same outage: do not warn again
    assert not breaker.allow()
    now[0] = 5.0
    assert breaker.allow()  # one probe
    assert not breaker.allow()  # and only one
    breaker.record_failure()
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    assert breaker.record_success() is True
    assert breaker.allow() and not breaker.is_open


def test_without_redis_everything_is_a_miss() -> None:
    async def main() -> None:
        cache = ImageCache(None)
        await cache.put_images({"http://x.test/a.jpg": JPEG})
        await cache.put_embeddings({"http://x.test/a.jpg": np.ones(4, np.float32)}, ENCODER)
        assert await cache.get_images(["http://x.test/a.jpg"]) == {}
        assert await cache.get_embeddings(["http://x.test/a.jpg"], ENCODER) == {}
        assert not cache.enabled and cache.stats.errors == 0
        await cache.aclose()

    run(main())


# -- against a real Redis -----------------------------------------------------------------------------------


def test_images_and_embeddings_round_trip_in_one_round_trip_per_batch(own_redis: RedisServer) -> None:
    urls = [f"http://img.test/{i}.jpg" for i in range(20)]
    embeddings = {u: np.full(32, i, dtype=np.float32) for i, u in enumerate(urls)}

    async def main() -> tuple[dict[str, bytes], dict[str, np.ndarray], dict[str, np.ndarray]]:
        cache = ImageCache(own_redis.url, image_ttl_s=100, embedding_ttl_s=1000)
        await cache.put_images({u: JPEG for u in urls[:10]})
        await cache.put_embeddings(dict(list(embeddings.items())[:15]), ENCODER)
        images = await cache.get_images(urls + urls[:3])  # duplicates are fine
        found = await cache.get_embeddings(urls, ENCODER)
        other = await cache.get_embeddings(urls, "another-encoder")
        await cache.aclose()
        return images, found, other

    images, found, other = run(main())
    assert set(images) == set(urls[:10]) and all(v == JPEG for v in images.values())
    assert set(found) == set(urls[:15])
    for url in urls[:15]:
        np.testing.assert_array_equal(found[url], embeddings[url])
    assert other == {}
    client = own_redis.client()
    image_ttls = [client.ttl(k) for k in client.keys("mmsent:img:*")]
    embedding_ttls = [client.ttl(k) for k in client.keys("mmsent:emb:*")]
    assert len(image_ttls) == 10 and all(90 <= t <= 100 for t in image_ttls)
    assert len(embedding_ttls) == 15 and all(990 <= t <= 1000 for t in embedding_ttls)


def test_oversized_images_are_not_cached(own_redis: RedisServer) -> None:
    async def main() -> dict[str, bytes]:
        cache = ImageCache(own_redis.url, max_image_bytes=len(JPEG) - 1)
        await cache.put_images({"http://img.test/big.jpg": JPEG, "http://img.test/empty.jpg": b""})
        found = await cache.get_images(["http://img.test/big.jpg", "http://img.test/empty.jpg"])
        await cache.aclose()
        return found

    assert run(main()) == {}
    assert own_redis.client().dbsize() == 0


def test_corrupt_and_foreign_values_are_misses(own_redis: RedisServer) -> None:
    url = "http://img.test/cat.jpg"
    cache = ImageCache(own_redis.url)
    client = own_redis.client()

    async def store() -> None:
        await cache.put_images({url: JPEG})
        await cache.put_embeddings({url: np.ones(8, np.float32)}, ENCODER)

    async def lookup() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
        return await cache.get_images([url]), await cache.get_embeddings([url], ENCODER)

    async def main() -> None:
        await store()
        images, embeddings = await lookup()
        assert url in images and url in embeddings
        for damage in (
            lambda v: v[:-3],  # truncated
            lambda v: v[:40] + bytes([v[40] ^ 0xFF]) + v[41:],  # one flipped byte
            lambda v: b"something else entirely",  # written by another program
            lambda v: b"",
        ):
            for key in (cache.image_key(url), cache.embedding_key(url, ENCODER)):
                client.set(key, damage(client.get(key) or b""))
            assert await lookup() == ({}, {})
            await store()
        # Swap the two values: an embedding under an image key and the other way round.
        image_value = client.get(cache.image_key(url))
        client.set(cache.image_key(url), client.get(cache.embedding_key(url, ENCODER)) or b"")
        client.set(cache.embedding_key(url, ENCODER), image_value or b"")
        assert await lookup() == ({}, {})
        assert cache.stats.corrupt == 10
        await cache.aclose()

    run(main())


# -- the consumer's image path, in miniature ------------------------------------------------------------------


@dataclass
class CountingEncoder:
    """Stands in for the CNN: counts forward passes (one per image)."""

    passes: int = 0
    seen: list[bytes] = field(default_factory=list)

    def embed(self, data: bytes) -> np.ndarray:
        self.passes += 1
        self.seen.append(data)
        return np.frombuffer(data[:64].ljust(64, b"\x00"), dtype=np.uint8).astype(np.float32)


async def image_path(
    urls: list[str], cache: ImageCache, fetcher: ImageFetcher, encoder: CountingEncoder
) -> dict[str, np.ndarray]:
    """Embeddings for a batch of posts' image URLs, as the consumer gets them."""
    embeddings = dict(await cache.get_embeddings(urls, ENCODER))
    missing = [u for u in dict.fromkeys(urls) if u not in embeddings]
    images = dict(await cache.get_images(missing))
    for url in missing:
        if url not in images:
            result = await fetcher.fetch(url)
            assert result.ok and result.data is not None
            images[url] = result.data
    fresh = {url: encoder.embed(images[url]) for url in missing}
    embeddings.update(fresh)
    await cache.put_images({u: images[u] for u in missing})
    await cache.put_embeddings(fresh, ENCODER, image_sizes={u: len(images[u]) for u in missing})
    return embeddings


def fetch_settings() -> Settings:
    return Settings(fetch_allow_cidrs="127.0.0.1/32", fetch_negative_cache_s=0, fetch_retries=0)


def test_a_repost_costs_no_request_and_no_cnn_pass(own_redis: RedisServer, image_server: ImageServer) -> None:
    cat = image_server.route("/cat.jpg", image(JPEG))
    dog = image_server.route("/dog.png", image(PNG, "image/png"))
    encoder = CountingEncoder()
    saved_before = metric("mmsent_cache_cnn_passes_saved_total")
    bytes_before = metric("mmsent_cache_bytes_saved_total")

    async def main() -> list[dict[str, np.ndarray]]:
        cache = ImageCache(own_redis.url)
        async with ImageFetcher(fetch_settings()) as fetcher:
            first = await image_path([cat], cache, fetcher, encoder)
            assert (image_server.count(), encoder.passes) == (1, 1)
            second = await image_path([cat], cache, fetcher, encoder)  # the repost
            assert (image_server.count(), encoder.passes) == (1, 1)
            # A batch with the cat again, a spelling of the same URL, and a new image.
            third = await image_path([cat, cat.replace("http://", "HTTP://"), dog], cache, fetcher, encoder)
        await cache.aclose()
        return [first, second, third]

    first, second, third = run(main())
    np.testing.assert_array_equal(first[cat], second[cat])
    assert image_server.count("/cat.jpg") == 1 and image_server.count("/dog.png") == 1
    assert encoder.passes == 2
    assert metric("mmsent_cache_cnn_passes_saved_total") - saved_before == 3
    assert metric("mmsent_cache_bytes_saved_total") - bytes_before == 3 * len(JPEG)


def test_a_new_encoder_reuses_cached_bytes_but_not_embeddings(
    own_redis: RedisServer, image_server: ImageServer
) -> None:
    cat = image_server.route("/cat.jpg", image(JPEG))
    encoder = CountingEncoder()

    async def main() -> None:
        cache = ImageCache(own_redis.url)
        async with ImageFetcher(fetch_settings()) as fetcher:
            await image_path([cat], cache, fetcher, encoder)
            # Same bytes, another encoder id: no download, one CNN pass.
            found = await cache.get_embeddings([cat], "encoder@2")
            assert found == {}
            assert await cache.get_images([cat]) == {cat: JPEG}
        await cache.aclose()

    run(main())
    assert image_server.count() == 1


def test_redis_stopping_mid_run_loses_nothing_and_its_return_restores_hits(
    own_redis: RedisServer, image_server: ImageServer
) -> None:
    urls = [image_server.route(f"/img{i}.jpg", image(sample_image("JPEG", color=(i * 20, 0, 0)))) for i in range(4)]
    encoder = CountingEncoder()
    errors_before = metric("mmsent_cache_errors_total", op="get_embeddings")

    async def main() -> None:
        cache = ImageCache(own_redis.url, retry_after_s=0.3, op_timeout_s=0.3)
        async with ImageFetcher(fetch_settings()) as fetcher:
            await image_path(urls, cache, fetcher, encoder)
            assert (image_server.count(), encoder.passes) == (4, 4)
            await image_path(urls, cache, fetcher, encoder)
            assert (image_server.count(), encoder.passes) == (4, 4)  # all hits

            own_redis.stop()
            for _round in range(3):  # every post still gets its embedding, from the network and the CNN
                started = time.monotonic()
                result = await image_path(urls, cache, fetcher, encoder)
                assert set(result) == set(urls)
                assert time.monotonic() - started < 2
            assert not cache.available
            assert (image_server.count(), encoder.passes) == (16, 16)

            own_redis.start()  # empty: it kept nothing
            await asyncio.sleep(0.4)  # past the back-off
            await image_path(urls, cache, fetcher, encoder)  # refills
            assert cache.available
            count, passes = image_server.count(), encoder.passes
            await image_path(urls, cache, fetcher, encoder)
            assert (image_server.count(), encoder.passes) == (count, passes)  # hits again
        await cache.aclose()

    run(main())
    assert metric("mmsent_cache_errors_total", op="get_embeddings") > errors_before


def test_a_frozen_redis_costs_at_most_the_timeout(own_redis: RedisServer) -> None:
    url = "http://img.test/a.jpg"

    async def main() -> None:
        cache = ImageCache(own_redis.url, retry_after_s=0.5, op_timeout_s=0.2)
        await cache.put_images({url: JPEG})
        own_redis.pause()  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            assert await cache.get_images([url]) == {}
            assert time.monotonic() - started < 0.6
            started = time.monotonic()
            for _ in range(50):  # backed off: no waiting at all
                assert await cache.get_images([url]) == {}
            assert time.monotonic() - started < 0.2
            assert cache.stats.errors == 1
        finally:
            own_redis.resume()
        await asyncio.sleep(0.6)
        for _attempt in range(50):  # the first call after the back-off probes; give it a few tries
            if await cache.get_images([url]) == {url: JPEG}:
                break
            await asyncio.sleep(0.1)
        assert await cache.get_images([url]) == {url: JPEG}
        assert cache.available
        await cache.aclose()

    run(main())


def test_the_cache_metrics_are_exported(own_redis: RedisServer) -> None:
    async def main() -> None:
        cache = ImageCache(own_redis.url)
        await cache.put_images({"http://img.test/a.jpg": JPEG})
        await cache.get_images(["http://img.test/a.jpg", "http://img.test/b.jpg"])
        await cache.aclose()

    hits = metric("mmsent_cache_hits_total", kind="image")
    misses = metric("mmsent_cache_misses_total", kind="image")
    run(main())
    assert metric("mmsent_cache_hits_total", kind="image") == hits + 1
    assert metric("mmsent_cache_misses_total", kind="image") == misses + 1
    assert REGISTRY.get_sample_value("mmsent_cache_available") == 1.0


# -- a cache that cannot lie --------------------------------------------------------------------------------


def test_a_value_copied_to_another_key_is_a_miss(own_redis: RedisServer) -> None:
    cat, dog = "http://img.test/cat.jpg", "http://img.test/dog.png"
    cache = ImageCache(own_redis.url)
    client = own_redis.client()
    corrupt_before = metric("mmsent_cache_corrupt_total", kind="image")

    async def main() -> None:
        await cache.put_images({cat: JPEG, dog: PNG})
        assert await cache.get_images([cat, dog]) == {cat: JPEG, dog: PNG}
        client.set(cache.image_key(dog) or "", client.get(cache.image_key(cat) or "") or b"")  # a copy
        assert await cache.get_images([cat, dog]) == {cat: JPEG}
        await cache.aclose()

    run(main())
    assert cache.stats.corrupt == 1
    assert metric("mmsent_cache_corrupt_total", kind="image") == corrupt_before + 1


def test_with_a_secret_only_entries_sealed_with_it_are_hits(own_redis: RedisServer) -> None:
    url = "http://img.test/cat.jpg"

    async def read(secret: bytes | None) -> dict[str, bytes]:
        cache = ImageCache(own_redis.url, secret=secret)
        found = await cache.get_images([url])
        await cache.aclose()
        return found

    async def write(secret: bytes | None) -> None:
        cache = ImageCache(own_redis.url, secret=secret)
        await cache.put_images({url: JPEG})
        await cache.aclose()

    run(write(None))
    assert run(read(None)) == {url: JPEG}
    assert run(read(b"s3cret")) == {}  # written without the secret: a miss
    run(write(b"s3cret"))
    assert run(read(b"s3cret")) == {url: JPEG}
    assert run(read(b"another")) == {} and run(read(None)) == {}
    settings = Settings(redis_url=own_redis.url, cache_secret="s3cret")
    assert run(ImageCache.from_settings(settings).get_images([url])) == {url: JPEG}


def test_embeddings_not_shaped_as_the_encoder_makes_them_are_misses(own_redis: RedisServer) -> None:
    url = "http://img.test/cat.jpg"
    made = np.linspace(-1, 1, 8, dtype=np.float32)  # what "the scorer" made: (8,) float32
    client = own_redis.client()

    async def main() -> None:
        cache = ImageCache(own_redis.url)
        key = cache.embedding_key(url, ENCODER) or ""
        client.set(key, encode_embedding(made, ENCODER, key))
        assert await cache.get_embeddings([url], ENCODER) == {}  # nothing stored by this process yet: unchecked
        await cache.put_embeddings({url: made}, ENCODER)  # learns (8,) float32
        found = await cache.get_embeddings([url], ENCODER)
        np.testing.assert_array_equal(found[url], made)
        for wrong in (np.ones(4, np.float32), np.ones((2, 4), np.float32), made.astype(np.float16),
                      np.array([np.nan] * 8, np.float32)):
            client.set(key, encode_embedding(wrong, ENCODER, key))
            assert await cache.get_embeddings([url], ENCODER) == {}
        await cache.put_embeddings({url: np.ones(4, np.float32)}, ENCODER)  # not what this encoder makes
        assert client.get(key) == encode_embedding(np.array([np.nan] * 8, np.float32), ENCODER, key)  # unchanged
        assert cache.stats.corrupt == 4
        await cache.aclose()

    run(main())


def _item(offset: int, url: str) -> WorkItem:
    item = WorkItem(PartitionState(("posts", 0)), "posts", 0, offset, None, b"{}", 0.0, None)
    item.post = PostEvent(post_id=f"p{offset}", text="hello", image_url=url)
    return item


async def _prepare(stage: ImageStage, urls: list[str]) -> list[WorkItem]:
    """The image stage on a batch of posts with these URLs, for a model whose image encoder is ENCODER."""
    batch = Batch(items=[_item(k, url) for k, url in enumerate(urls)], oldest_at=0.0, cut_at=0.0)
    return (await stage.prepare(batch, ENCODER)).items


def _mgets(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_mget", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


def test_a_url_the_policy_refuses_is_blocked_without_reading_its_cached_entry(own_redis: RedisServer) -> None:
    url = "http://127.0.0.1:9/cat.jpg"  # loopback: refused by the default policy, before any connection
    embedding = np.ones(8, np.float32)
    client = own_redis.client()

    async def main() -> None:
        cache = ImageCache(own_redis.url)
        await cache.put_images({url: JPEG})
        await cache.put_embeddings({url: embedding}, ENCODER)  # the entry is there, and valid
        strict = Settings()
        async with ImageFetcher(strict) as fetcher:
            assert fetcher.refuses(url) == FetchResult.blocked("loopback")
            reads = _mgets(client)
            (item,) = await _prepare(ImageStage(fetcher, cache, image_decoder(strict), Metrics.get()), [url])
            assert (item.image_status, item.image) == (ImageStatus.BLOCKED, None)
            assert _mgets(client) == reads  # not one cache read
        # The same entry under a policy that allows loopback is served: the cache would have answered.
        lenient = Settings(fetch_allow_cidrs="127.0.0.1/32")
        async with ImageFetcher(lenient) as fetcher:
            assert fetcher.refuses(url) is None
            (item,) = await _prepare(ImageStage(fetcher, cache, image_decoder(lenient), Metrics.get()), [url])
            assert item.image_status is ImageStatus.OK
            np.testing.assert_array_equal(item.image, embedding)
        await cache.aclose()

    run(main())


URL_CHARS = st.sampled_from(list("aZ09/.-_~%?#&=:@;+!") + ["\t", "\n", "\r", " ", "\\", "é"])


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "Https"]),
    host=st.sampled_from(["img.test", "IMG.Test", "img.test.", "xn--bcher-kva.test", "bücher.test"]),
    port=st.sampled_from(["", ":80", ":443", ":8080"]),
    rest=st.text(URL_CHARS, max_size=24),
    edit=st.tuples(st.integers(0, 23), URL_CHARS),
)
def test_one_normal_form_for_fetch_and_keys_and_never_a_shared_key(
    scheme: str, host: str, port: str, rest: str, edit: tuple[int, str]
) -> None:
    url = f"{scheme}://{host}{port}/{rest}"
    normal = normalise_url(url)
    policy = AddressPolicy()
    if any(c in url for c in "\t\r\n"):
        assert normal is None  # refused, never stripped
    if normal is None:
        with pytest.raises(Refused):
            policy.check_url(url)
        return
    assert policy.check_url(url).url == normal  # what the fetcher requests is what the key is made from
    assert normalise_url(normal) == normal
    cache = ImageCache(None)
    # Another character in the path or query (before any fragment): the same key exactly when the fetcher sends
    # the same request (an empty "?" is dropped, for one), never because a character was lost on the way.
    where, char = edit
    cut = len(url) - len(rest) + min(where, len(rest.split("#")[0]))
    other = url[:cut] + char + url[cut:]
    other_normal = normalise_url(other)
    if other_normal is not None:
        assert (cache.image_key(other) == cache.image_key(url)) == (policy.check_url(other).url == normal)
        if char not in "?#":
            assert cache.image_key(other) != cache.image_key(url)


# -- Redis with a password, over TLS --------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["password", "password+tls"])
def test_redis_with_a_password_and_tls_serves_hits(tmp_path: Path, tls: bool) -> None:
    server = RedisServer(tmp_path, password="right horse", tls=make_tls(tmp_path / "tls") if tls else None)
    server.start()
    url = "http://img.test/cat.jpg"

    async def main(redis_url: str) -> tuple[dict[str, bytes], ImageCache]:
        cache = ImageCache.from_settings(Settings(redis_url=redis_url))
        await cache.put_images({url: JPEG})
        found = await cache.get_images([url])
        await cache.aclose()
        return found, cache

    try:
        assert server.url.startswith("rediss://" if tls else "redis://")
        found, cache = run(main(server.url))
        assert found == {url: JPEG} and cache.stats.errors == 0
        assert server.client().dbsize() == 1
        if tls:  # a CA that did not sign the server's certificate: no connection, the cache only misses
            wrong_ca = make_tls(tmp_path / "other", name="other").ca
            found, cache = run(main(server.url_with("right horse", ca=wrong_ca)))
            assert found == {} and cache.stats.errors >= 1 and not cache.available
    finally:
        server.stop()


def test_a_wrong_password_turns_the_cache_off_once_and_scoring_goes_on(
    tmp_path: Path, image_server: ImageServer
) -> None:
    server = RedisServer(tmp_path, password="right horse", tls=make_tls(tmp_path / "tls"))
    server.start()
    urls = [image_server.route(f"/img{i}.jpg", image(sample_image("JPEG", color=(i * 40, 0, 0)))) for i in range(3)]
    settings = fetch_settings().model_copy(update={"redis_url": server.url_with("wrong staple")})

    async def main() -> tuple[list[list[WorkItem]], ImageCache]:
        cache = ImageCache.from_settings(settings)
        async with ImageFetcher(settings) as fetcher:
            stage = ImageStage(fetcher, cache, image_decoder(settings), Metrics.get())
            batches = [await _prepare(stage, urls) for _ in range(3)]
        await cache.aclose()
        return batches, cache

    try:
        with structlog.testing.capture_logs() as logs:
            batches, cache = run(main())
    finally:
        server.stop()
    for items in batches:  # every image fetched and decoded, batch after batch: the cache is only an optimisation
        assert [item.image_status for item in items] == [ImageStatus.OK] * 3
        assert all(isinstance(item.image, Image.Image) for item in items)
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["cache_turned_off"]
    assert "wrong staple" not in repr(logs)
    assert cache.stats.errors == 1 and not cache.enabled and not cache.available
    assert REGISTRY.get_sample_value("mmsent_cache_available") == 0.0
    assert image_server.count() == 9
