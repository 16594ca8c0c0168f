"""The consumer and its model's device: before it is ready it warms the model on every shape, on each thread that
scores; its batch limits suit the device unless set; a GPU scorer gets image bytes to decode itself. With the tiny
random model, on a real broker."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from consumer.app import Application
from consumer.settings import Settings
from mmsent import Scorer
from mmsent.presets import from_config, preset_config
from tests.consumerutil import Topics, make_settings, post, settings_env, wait_until
from tests.kafkautil import create_topics, produce, read_all


class GatedScorer:
    """A bucketing tiny-random Scorer whose warm-ups wait for `gate` and say on which thread they ran."""

    def __init__(self) -> None:
        self.scorer = Scorer(from_config(preset_config("tiny-random")), cpu_runtime="torch", bucketing=True,
                             batch_size=16)
        self.gate = threading.Event()
        self.warmed: list[tuple[str, int]] = []  # (thread name, model calls)
        self.info, self.image_encoder_id = self.scorer.info, self.scorer.image_encoder_id
        self.serving_batch_size = self.scorer.serving_batch_size

    def warm_up(self) -> int:
        self.gate.wait(60)
        calls = self.scorer.warm_up()
        self.warmed.append((threading.current_thread().name, calls))
        return calls

    def score(self, posts: Any) -> Any:
        return self.scorer.score(posts)

    def embed_images(self, images: Any) -> Any:
        return self.scorer.embed_images(images)


@pytest.mark.kafka
def test_readyz_turns_ready_only_after_every_shape_is_warmed_on_each_model_thread(kafka_bootstrap: str,
                                                                                  unique_name: str) -> None:
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    scorer = GatedScorer()
    app = Application(make_settings(settings_env(kafka_bootstrap, topics, None)), scorer=scorer)
    thread = threading.Thread(target=app.run, name="app-main", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: app.health is not None, timeout=30)
        assert app.health is not None
        readyz = f"http://127.0.0.1:{app.health.port}/readyz"
        assert httpx.get(readyz).status_code == 503  # the warm-up is held at the gate
        assert not app.ready and not scorer.warmed
        scorer.gate.set()
        assert wait_until(lambda: httpx.get(readyz).status_code == 200, timeout=60), "never ready"
        buckets = scorer.scorer.buckets
        assert buckets is not None
        every_shape = len(buckets.text_shapes()) + len(buckets.batch_sizes) + len(buckets.head_sizes) + 1
        # the loading thread (where a compilation would happen), then each model thread (per-thread CUDA graphs)
        assert [name for name, _ in scorer.warmed] == ["app-main", "mmsent-model-0", "mmsent-model-1"]
        assert all(calls >= every_shape for _, calls in scorer.warmed)
        produce(kafka_bootstrap, topics.posts, [post("p1", "after the warm-up")])
        assert wait_until(lambda: len(read_all(kafka_bootstrap, topics.sentiment)) == 1, timeout=30)
    finally:
        scorer.gate.set()
        app.stop()
        thread.join(60)
    assert not thread.is_alive()


def _env(**extra: str) -> Settings:
    return Settings(**{"kafka_bootstrap_servers": "localhost:1", **extra})


def test_batch_limits_follow_the_device_unless_set() -> None:
    cpu = Scorer(from_config(preset_config("tiny-random")), device="cpu", cpu_runtime="torch")
    assert cpu.serving_batch_size == 32
    assert _env().batch_limits(cpu.serving_batch_size) == (32, 256)  # the CPU's defaults, as they always were
    assert _env().batch_limits(256) == (256, 2048)  # a GPU: hundreds of posts a batch, 8 batches in flight
    assert _env(max_batch_size="8").batch_limits(256) == (8, 256)  # set explicitly: it wins
    assert _env(max_batch_size="512", max_in_flight="600").batch_limits(32) == (512, 600)


def test_the_environment_sets_the_batch_size_and_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSENT_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("MMSENT_COMPILE", "true")
    settings = Settings()
    assert settings.batch_limits(256) == (64, 512) and settings.compile
    monkeypatch.delenv("MMSENT_MAX_BATCH_SIZE")
    monkeypatch.delenv("MMSENT_COMPILE")
    assert Settings().max_batch_size is None and not Settings().compile


def test_a_gpu_scorer_gets_header_checked_bytes_and_a_bad_header_is_refused_as_before() -> None:
    from consumer.fetch import image_decoder
    from mmsent import ImageDecodeError
    from tests.imageserver import sample_image

    settings = _env(fetch_max_side="64")
    jpeg = sample_image("JPEG", color=(200, 10, 10))
    assert image_decoder(settings, keep_bytes=True)(jpeg) is jpeg  # no pixel decoded here: the GPU does it
    assert image_decoder(settings)(jpeg).mode == "RGB"
    for bad in (b"\xff\xd8 not a jpeg", sample_image("PNG", size=(100, 20))):
        for keep_bytes in (True, False):
            with pytest.raises(ImageDecodeError):
                image_decoder(settings, keep_bytes=keep_bytes)(bad)
