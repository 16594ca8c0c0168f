"""The wire contracts of mmsent, exactly as `../shared/CONTRACT.md` defines them (schema version 1).

Pydantic v2 models, strict: a number is not a string, a string is not a number. The JSON Schema files in
`schemas/json/` are generated from these models (`mmsent schema --write schemas/json`) and a test fails when
they drift apart.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_VERSION: Literal[1] = 1
DEFAULT_MAX_TEXT_CHARS = 10_000
MAX_POST_ID_CHARS = 256
MAX_IMAGE_URL_CHARS = 2_048
LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
LANGUAGE_CODE = r"^[a-z]{2}$"  # ISO 639-1


class Label(StrEnum):
    NEGATIVE = "negative"
    NEUTRAL = "neutral"
    POSITIVE = "positive"


class ImageStatus(StrEnum):
    OK = "ok"  # the image was used
    NONE = "none"  # the post had no image
    UNAVAILABLE = "unavailable"  # fetch or decode failed
    BLOCKED = "blocked"  # the URL was refused by the fetch policy


class PostEvent(BaseModel):
    """A post on the input topic. Unknown fields are ignored (and never reach the output).

    The text limit is configurable: validate with `PostEvent.model_validate(obj, context={"max_text_chars": n})`.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    post_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_POST_ID_CHARS)]
    text: StrictStr = Field(
        default="",
        description=f"The caption; may be empty; at most {DEFAULT_MAX_TEXT_CHARS} characters by default.",
        # The enforced limit is configurable (the validator below); the schema states the default.
        json_schema_extra={"maxLength": DEFAULT_MAX_TEXT_CHARS},
    )
    image_url: Annotated[StrictStr, Field(max_length=MAX_IMAGE_URL_CHARS)] | None = None
    created_at: AwareDatetime | None = Field(default=None, description="RFC 3339 date-time.")

    @field_validator("text")
    @classmethod
    def _text_within_limit(cls, text: str, info: ValidationInfo) -> str:
        limit = (info.context or {}).get("max_text_chars", DEFAULT_MAX_TEXT_CHARS)
        if len(text) > limit:
            raise ValueError(f"text is {len(text)} characters, more than the limit of {limit}")
        return text

    @field_validator("created_at", mode="before")
    @classmethod
    def _created_at_is_rfc3339_string(cls, value: Any) -> Any:
        # Strict mode would refuse the string; RFC 3339 text is exactly what the contract carries.
        if value is None or isinstance(value, datetime):
            return value
        if not isinstance(value, str):
            raise ValueError("created_at must be an RFC 3339 string")
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"created_at is not an RFC 3339 date-time: {exc}") from None


class SourceCoordinates(BaseModel):
    """Where an input record was read: a consumer that sees the same coordinates twice has a repeat."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    topic: StrictStr = Field(min_length=1)
    partition: StrictInt = Field(ge=0)
    offset: StrictInt = Field(ge=0)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    name: StrictStr = Field(min_length=1)
    version: StrictStr = Field(min_length=1)


class Scores(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    negative: float = Field(ge=0, le=1)
    neutral: float = Field(ge=0, le=1)
    positive: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Scores:
        total = self.negative + self.neutral + self.positive
        if not math.isclose(total, 1.0, abs_tol=1e-3):
            raise ValueError(f"scores must sum to 1, they sum to {total:.6f}")
        return self


class ScoresByModality(BaseModel):
    """What each modality alone says: the model's head with the other modality marked absent."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: Scores | None = Field(default=None, description="The caption alone; present when the caption is non-empty.")
    image: Scores | None = Field(default=None, description="The image alone; present when the image was used.")


class AlertRule(StrEnum):
    MIN_PROBABILITY = "min_probability"  # MMSENT_ALERT_MIN_PROBABILITY: a threshold set by the operator
    MIN_PRECISION = "min_precision"  # MMSENT_ALERT_MIN_PRECISION: the threshold the model's calibration gives


class Alert(BaseModel):
    """Why an event is on the alert topic: the rule that fired and what it compared."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rule: AlertRule = Field(strict=False)
    label: Label = Field(strict=False, description="The alert label, the event's label.")
    probability: float = Field(ge=0, le=1, description="The label's probability, as compared.")
    threshold: float = Field(ge=0, le=1, description="The probability at or above which the label alerts.")
    min_precision: float | None = Field(
        ge=0, le=1, description="The target precision the calibration gave the threshold for; null for min_probability."
    )
    calibration: StrictStr | None = Field(
        description="SHA-256 of the model weights that the model's calibration was fitted on (its temperature "
        "shaped `probability`; under `min_precision` it gave `threshold` too); null when the model has no "
        "calibration or it did not record them."
    )


class SentimentEvent(BaseModel):
    """A scored post on the output topic."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    post_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_POST_ID_CHARS)]
    # Enum and date fields accept their JSON spellings (strings) from Python dicts too.
    label: Label = Field(strict=False)
    scores: Scores
    image_status: ImageStatus = Field(strict=False)
    model: ModelInfo
    source: SourceCoordinates
    scored_at: AwareDatetime = Field(strict=False, description="RFC 3339 date-time.")
    scores_by_modality: ScoresByModality = Field(default_factory=ScoresByModality)
    # Defaulted, not required: an event written before these fields existed (in a topic, in a replay's
    # comparison) still validates, and reads as "not known" (null) or "supported" (nothing says otherwise).
    modalities_agree: bool | None = Field(
        default=None,
        description="Whether the text alone and the image alone give the same label; null when only one modality "
        "was used.",
    )
    language: Annotated[StrictStr, Field(pattern=LANGUAGE_CODE)] | None = Field(
        default=None, description="The caption's language, ISO 639-1 (`en`, `es`...); null when it cannot be told."
    )
    language_supported: bool = Field(
        default=True,
        description="Whether the model was trained for the caption's language (a post in another language is "
        "still scored); true when the language is null.",
    )
    alert: Alert | None = Field(default=None, description="Present on the alert topic's copy only: why it alerts.")

    def to_json_bytes(self) -> bytes:
        # A modality that says nothing is left out of `scores_by_modality`, and `alert` out of an event that is not
        # an alert; the contract's nullable fields (`modalities_agree`, `language`, the alert's) are written as null.
        silent = {name for name in ("text", "image") if getattr(self.scores_by_modality, name) is None}
        exclude: dict[str, Any] = {"scores_by_modality": silent}
        if self.alert is None:
            exclude["alert"] = True
        return self.model_dump_json(exclude=exclude).encode()


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    code: StrictStr = Field(min_length=1, description="Stable, machine-readable, e.g. `invalid_json`.")
    message: StrictStr = Field(description="For a person: which field, which rule.")


class DeadLetter(BaseModel):
    """A record that could not be scored at all, kept whole so that nothing is silently lost; or, when the whole
    would not fit the dead-letter topic, its value and key cut to fit, saying so and how long they were."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    error: ErrorInfo
    source: SourceCoordinates
    value_b64: StrictStr | None = Field(description="The original record value, base64; null for a null value.")
    key_b64: StrictStr | None = Field(default=None, description="The original record key, base64, when present.")
    failed_at: AwareDatetime | None = Field(default=None, strict=False)
    value_truncated: bool = Field(default=False, description="`value_b64` holds only the value's first bytes.")
    key_truncated: bool = Field(default=False, description="`key_b64` holds only the key's first bytes.")
    value_size: StrictInt | None = Field(default=None, ge=0, description="The original value's size in bytes.")
    key_size: StrictInt | None = Field(default=None, ge=0, description="The original key's size in bytes.")

    @classmethod
    def for_record(
        cls,
        *,
        code: str,
        message: str,
        source: SourceCoordinates,
        value: bytes | None,
        key: bytes | None,
        failed_at: datetime | None = None,
        keep_value: int | None = None,
        keep_key: int | None = None,
    ) -> DeadLetter:
        """`keep_value` / `keep_key`: at most this many of the first bytes are kept (None: all)."""
        return cls(
            error=ErrorInfo(code=code, message=message),
            source=source,
            value_b64=_b64(value, keep_value),
            key_b64=_b64(key, keep_key),
            failed_at=failed_at,
            value_truncated=_cut(value, keep_value),
            key_truncated=_cut(key, keep_key),
            value_size=None if value is None else len(value),
            key_size=None if key is None else len(key),
        )

    def original_value(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def _cut(data: bytes | None, keep: int | None) -> bool:
    return data is not None and keep is not None and len(data) > keep


def _b64(data: bytes | None, keep: int | None) -> str | None:
    return None if data is None else base64.b64encode(data[:keep]).decode("ascii")
