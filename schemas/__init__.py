"""Wire contracts: the post, the sentiment event and the dead letter. Imports neither `mmsent` nor `consumer`."""

from schemas.decode import BadRecord, decode_post
from schemas.export import json_schemas
from schemas.models import (
    LABELS,
    SCHEMA_VERSION,
    DeadLetter,
    ErrorInfo,
    ImageStatus,
    Label,
    ModelInfo,
    PostEvent,
    Scores,
    SentimentEvent,
    SourceCoordinates,
)

__all__ = [
    "LABELS",
    "SCHEMA_VERSION",
    "BadRecord",
    "DeadLetter",
    "ErrorInfo",
    "ImageStatus",
    "Label",
    "ModelInfo",
    "PostEvent",
    "Scores",
    "SentimentEvent",
    "SourceCoordinates",
    "decode_post",
    "json_schemas",
]
