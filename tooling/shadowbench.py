"""`mmsent bench shadow`: what a shadow model costs the primary, measured side by side in one run.

The same batches (fresh images: every one through the CNN) go through the primary's model stage alone and with a
shadow, alternately; the figure is the model stage's time per batch (what the pipeline waits for) with and without.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from consumer.batcher import Batch, WorkItem
from consumer.errors import ErrorPolicy
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.shadow import ShadowStage
from consumer.stages import ModelStage
from mmsent import Scorer, decode_image
from mmsent.benchmarks.host import sample_photos, synthetic_captions
from schemas.models import ImageStatus, ModelInfo, PostEvent


def run_shadow(model: str | None, shadow: str | None, batch_size: int, rounds: int) -> dict[str, Any]:
    primary, second = Scorer.load(model), Scorer.load(shadow if shadow is not None else model)
    photos, source = sample_photos(batch_size)
    images, captions = [decode_image(p) for p in photos], synthetic_captions(batch_size)
    metrics, policy = Metrics.get(), ErrorPolicy()
    info = ModelInfo(**{str(k): str(v) for k, v in dict(second.info).items()})
    same = second.image_encoder_id == primary.image_encoder_id
    stages = {"alone": ModelStage(primary, None, None, policy, metrics),
              "with shadow": ModelStage(primary, None, None, policy, metrics,
                                        shadow=ShadowStage(second, info, same, metrics))}
    times: dict[str, list[float]] = {name: [] for name in stages}
    for run in range(rounds + 1):  # the first round warms up and is not counted
        for name, stage in stages.items():
            batch = _batch(images, captions, f"{name}-{run}")
            started = time.perf_counter()
            stage.run(batch)
            if run:
                times[name].append(time.perf_counter() - started)
    alone, shadowed = (statistics.median(times[name]) * 1000 for name in stages)
    return {"model": primary.info, "shadow": second.info, "same_image_encoder": same, "batch_size": batch_size,
            "rounds": rounds, "images": source, "alone_ms": alone, "with_shadow_ms": shadowed,
            "slowdown": shadowed / alone}


def _batch(images: list[Any], captions: list[str], run: str) -> Batch:
    """A batch of posts with decoded images under URLs new to this run, so that every image meets the CNN."""
    tracker = OffsetTracker()
    state = tracker.state(("bench", 0))
    items = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        item = WorkItem(state=state, topic="bench", partition=0, offset=i, key=None, value=None, received_at=0.0,
                        timestamp_ms=None, post=PostEvent(post_id=f"{run}-{i}", text=caption))
        item.image, item.image_status, item.image_url_key = image, ImageStatus.OK, f"http://bench/{run}/{i}.jpg"
        items.append(item)
    return Batch(items=items, oldest_at=0.0, cut_at=0.0)


def render_shadow(result: dict[str, Any], command: str) -> str:
    same = "the same image encoder: its CNN skipped" if result["same_image_encoder"] else "its own image encoder"
    return (f"`{command}` ({result['images']}, batch {result['batch_size']}, median of {result['rounds']}): the "
            f"primary's model stage {result['alone_ms']:.0f} ms per batch alone, {result['with_shadow_ms']:.0f} ms "
            f"with the shadow ({same}): x{result['slowdown']:.2f}")
