"""The seams of the pipeline: what the stages need of a scorer, its results, a fetcher and a cache, as protocols.

The service runs `mmsent.Scorer`, `consumer.fetch.ImageFetcher` and `consumer.cache.ImageCache`; the tests and the
benchmarks hand in their own. This module is the bottom of the consumer's own imports (it imports no other
consumer module), so every module that names a seam imports it one way:

    protocols ◀── batcher ◀── stages ◀── shadow ◀── app
        ▲            ▲                     │
        └────────────┴─────────────────────┘
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from schemas.models import ModelInfo


class ScoreResultLike(Protocol):
    """What every result has (`mmsent.ScoreResult`). `image_used` and `scores_by_modality` are read with a default
    where they are read: a test double may have neither."""

    @property
    def label(self) -> str: ...
    @property
    def scores(self) -> Mapping[str, float]: ...


class ScorerLike(Protocol):
    @property
    def info(self) -> Mapping[str, str]: ...
    @property
    def image_encoder_id(self) -> str: ...

    def score(self, posts: Sequence[Mapping[str, Any]]) -> Sequence[ScoreResultLike]: ...
    def embed_images(self, images: Sequence[Any]) -> list[Any]: ...


class ScoringModel(Protocol):
    """What scored an item, as its event says it: the primary's `batcher.ServingModel` or a `shadow.ShadowStage`."""

    @property
    def scorer(self) -> ScorerLike: ...
    @property
    def info(self) -> ModelInfo: ...


class FetcherLike(Protocol):
    def refuses(self, url: str) -> Any | None: ...
    async def fetch_image(self, url: str) -> tuple[Any, Any]: ...
    async def aclose(self) -> None: ...


class CacheLike(Protocol):
    async def get_embeddings(self, urls: Sequence[str], encoder_id: str) -> Mapping[str, Any]: ...
    async def put_embeddings(
        self, embeddings: Mapping[str, Any], encoder_id: str, image_sizes: Mapping[str, int] | None = None
    ) -> Any: ...
    async def get_images(self, urls: Sequence[str]) -> Mapping[str, bytes]: ...
    async def put_images(self, images: Mapping[str, bytes]) -> Any: ...


def is_embedding(image: Any) -> bool:
    """An image the CNN has already seen (a cached or just computed embedding: an array), not pixels or bytes."""
    return hasattr(image, "dtype") and hasattr(image, "shape")
