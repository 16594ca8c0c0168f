"""mmsent: multimodal (caption + image) sentiment. See ARCHITECTURE.md for the public face and the layers:

    core (imaging, textnorm, encoders, model, data, runtime, device, presets, reference)
      ◀── serving ◀── evaluation ◀── training ◀── benchmarks ◀── cli          (each imports only the layers left of it)
"""

from mmsent.imaging import ImageDecodeError, decode_image, decode_opened, open_checked, sniff_format
from mmsent.model import ModelRefused, RefusalReason
from mmsent.reference import TOP_PROBABILITY_EDGES, Reference
from mmsent.serving import ImageEmbedding, Scorer, ScoreResult

__all__ = [
    "TOP_PROBABILITY_EDGES", "ImageDecodeError", "ImageEmbedding", "ModelRefused", "RefusalReason", "Reference",
    "ScoreResult", "Scorer", "decode_image", "decode_opened", "open_checked", "sniff_format",
]
