"""Vetting a model before it serves: the first one at start-up and every reload candidate go through the same door,
so that a model that would score NaN, exhaust memory or fail on its first batch never serves.

    MMSENT_MODEL ──Scorer.load(max_params=MMSENT_MODEL_MAX_PARAMS)──▶ (mmsent: each check before the next one's cost)
        config.json read ─▶ parameter count from the config (meta device) <= budget ─▶ model built
        ─▶ model.safetensors' header: names and shapes the model's ─▶ tensors read ─▶ every weight finite
        ─▶ calibration.json: finite temperature, thresholds in [0, 1]
    ──vet(scorer)──▶ probe posts (text; text + image; image alone) scored: every probability finite, in [0, 1],
                     each distribution summing to 1
    ──▶ serving                       any step ──▶ ModelRefused(reason): at start-up the consumer does not start
                                                   (the message says why); on a reload the serving model goes on

`ModelRefused.reason` is a stable code (`mmsent.RefusalReason`): what `model_reload_refused` logs; anything else a
loader raises is `load_failed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from consumer.settings import Settings
from mmsent import ModelRefused, RefusalReason, Scorer, ScoreResult

__all__ = ["load_vetted", "probe_posts", "probe_problem", "refusal_reason", "vet"]

# A distribution whose probabilities sum this far from 1 is not one (float32 softmax sums to within ~1e-6).
SUM_TOLERANCE = 1e-3


def probe_posts() -> list[dict[str, Any]]:
    """Posts that take every path through the model: the text encoder alone, both encoders and the fusion (and each
    modality alone), the image encoder alone. The image is a gradient, not a flat colour, so the CNN sees edges."""
    gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    return [
        {"text": "a probe post before this model serves", "image": None},
        {"text": "a probe post with a picture", "image": gradient},
        {"text": "", "image": gradient},
    ]


def probe_problem(results: Sequence[ScoreResult]) -> ModelRefused | None:
    """What is wrong with the probe posts' scores, or None: each distribution (the post's, and what each modality
    alone says) must hold finite probabilities in [0, 1] summing to 1."""
    for k, result in enumerate(results):
        for where, scores in (("scores", result.scores), *result.scores_by_modality.items()):
            problem = _distribution_problem(scores)
            if problem is not None:
                reason, what = problem
                return ModelRefused(reason, f"probe post {k}: {where} {what}: {dict(scores)}")
    return None


def _distribution_problem(scores: Mapping[str, float]) -> tuple[RefusalReason, str] | None:
    values = list(scores.values())
    if not all(math.isfinite(p) for p in values):
        return RefusalReason.NON_FINITE_SCORES, "not finite"
    if not all(0.0 <= p <= 1.0 for p in values) or abs(sum(values) - 1.0) > SUM_TOLERANCE:
        return RefusalReason.SCORES_OUT_OF_RANGE, "not probabilities summing to 1"
    return None


def vet(scorer: Scorer) -> None:
    """Score the probe posts; raise `ModelRefused` (non_finite_scores, scores_out_of_range) when the scores are not
    probabilities. A model whose weights are finite can still overflow (weights of 1e30 make infinite logits)."""
    problem = probe_problem(scorer.score(probe_posts()))
    if problem is not None:
        raise problem


def load_vetted(settings: Settings, model: str | None) -> Scorer:
    """The scorer of `model` (a directory, a preset, None: the packaged default) on the configured device and
    runtime, with the fetcher's image limits, checked by `Scorer.load` within MMSENT_MODEL_MAX_PARAMS and by `vet`.
    Raises `ModelRefused` (or whatever a loader raises) for a model that must not serve."""
    device = None if settings.device == "auto" else settings.device  # None: the Scorer takes a GPU when there is one
    scorer = Scorer.load(model, device=device, cpu_runtime=settings.cpu_runtime, compile=settings.compile,
                         max_params=settings.model_max_params, cpu_precision=settings.cpu_precision)
    # the limits it checks the image bytes it decodes itself with (on a GPU), as the fetcher's
    scorer.max_pixels, scorer.max_side = settings.fetch_max_pixels, settings.fetch_max_side
    vet(scorer)
    return scorer


def refusal_reason(exc: BaseException) -> str:
    """The stable code to log and count for a model that failed to load."""
    return exc.reason.value if isinstance(exc, ModelRefused) else RefusalReason.LOAD_FAILED.value
