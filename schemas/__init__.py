"""Wire contracts: the post, the sentiment event, the dead letter and the feedback verdict. Imports neither
`mmsent` nor `consumer`."""

from schemas.decode import BadRecord, decode_post
from schemas.export import json_schemas
from schemas.feedback import FeedbackVerdict, decode_verdict
from schemas.models import (
    LABELS,
    SCHEMA_VERSION,
    Alert,
    AlertRule,
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
    "Alert",
    "AlertRule",
    "BadRecord",
    "DeadLetter",
    "ErrorInfo",
    "FeedbackVerdict",
    "ImageStatus",
    "Label",
    "ModelInfo",
    "PostEvent",
    "Scores",
    "SentimentEvent",
    "SourceCoordinates",
    "decode_post",
    "decode_verdict",
    "json_schemas",
]
