"""mmsent: multimodal (caption + image) sentiment. See ARCHITECTURE.md for the public face."""

from mmsent.imaging import ImageDecodeError, decode_image, decode_opened, open_checked, sniff_format
from mmsent.reference import Reference
from mmsent.scorer import ImageEmbedding, ModelRefused, RefusalReason, Scorer, ScoreResult

__all__ = [
    "ImageDecodeError", "ImageEmbedding", "ModelRefused", "Reference", "RefusalReason", "ScoreResult", "Scorer",
    "decode_image", "decode_opened", "open_checked", "sniff_format",
]
