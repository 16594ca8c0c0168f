"""The shadow model: a second model scores the same batches, after the primary, and its events go to the shadow
topic; it never fails the primary.

    ModelStage.run(batch): embed (primary CNN) ──▶ score (primary) ──▶ ShadowStage.run(items)
                                                                         │ same image encoder: the primary's
                                                                         │   embeddings, no second CNN pass
                                                                         │ another: the decoded images, its CNN
                                                                         ▼
                                                item.shadow_result ──▶ consumer/outputs.py: the shadow event

What it costs the primary: the shadow's own scoring time on the model thread, per batch (with the same image
encoder, its text encoder and head only); with another image encoder, also the embedding cache's reads (both CNNs
then see every image, as the cache holds the primary's embeddings). A shadow that raises costs a log line and a
metric, and its events for that batch are missing; the primary's are not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from consumer.batcher import WorkItem
from consumer.metrics import Metrics
from consumer.protocols import ScorerLike, is_embedding
from schemas.models import ModelInfo

log = structlog.get_logger("consumer")


@dataclass(frozen=True)
class ShadowStage:
    scorer: ScorerLike
    info: ModelInfo
    same_image_encoder: bool  # the primary's embeddings serve it too
    metrics: Metrics

    def keep_pixels(self, items: Sequence[WorkItem]) -> None:
        """Before the primary's CNN replaces decoded images with its embeddings: keep them for another encoder."""
        if not self.same_image_encoder:
            for item in items:
                item.shadow_image = None if is_embedding(item.image) else item.image

    def run(self, items: Sequence[WorkItem]) -> None:
        scored = [item for item in items if item.result is not None and item.post is not None]
        if not scored:
            return
        started = time.monotonic()
        try:
            results = self.scorer.score([self._post(item) for item in scored])
            if len(results) != len(scored):
                raise RuntimeError(f"the shadow returned {len(results)} results for {len(scored)} posts")
        except Exception as exc:  # the shadow never fails the primary
            self.metrics.shadow_failures.inc()
            log.warning("shadow_model_failed", error=repr(exc)[:500], posts=len(scored))
            return
        finally:
            self.metrics.stage_latency.labels("shadow").observe(time.monotonic() - started)
        for item, result in zip(scored, results, strict=True):
            item.shadow_result, item.shadow_by = result, self
            agrees = item.result is not None and result.label == item.result.label  # scored: it has a result
            self.metrics.shadow_agreement.labels(str(agrees).lower()).inc()

    def _post(self, item: WorkItem) -> dict[str, object]:
        assert item.post is not None
        return {"text": item.post.text, "image": item.image if self.same_image_encoder else item.shadow_image}
