"""mmsent: multimodal (caption + image) sentiment. See ARCHITECTURE.md for the public face."""

from mmsent.imaging import ImageDecodeError, decode_image, decode_opened, open_checked, sniff_format
from mmsent.reference import TOP_PROBABILITY_EDGES, Reference
from mmsent.scorer import ImageEmbedding, ModelRefused, RefusalReason, Scorer, ScoreResult

__all__ = [
    "TOP_PROBABILITY_EDGES", "ImageDecodeError", "ImageEmbedding", "ModelRefused", "Reference", "RefusalReason",
    "ScoreResult", "Scorer", "decode_image", "decode_opened", "open_checked", "sniff_format",
]
