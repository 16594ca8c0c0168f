"""The feedback message: a moderation tool's verdict on a scored post (topic `MMSENT_FEEDBACK_TOPIC`, optional).

    bytes ──▶ size ──▶ FeedbackVerdict.model_validate_json (UTF-8, JSON, fields) ──▶ FeedbackVerdict
              too_large   invalid_verdict (whatever the parser or pydantic say)

The consumer joins a verdict to the event it produced for the same `post_id` (consumer/feedback.py); a message that is
not a verdict is counted and logged there, never an error. `decode_verdict` raises only `BadRecord`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictStr, ValidationError

from schemas.decode import BadRecord
from schemas.models import MAX_POST_ID_CHARS, Label

# A verdict is a few hundred bytes; far larger is not one, and is refused before parsing.
MAX_VERDICT_BYTES = 64 * 1024
MAX_REVIEWER_CHARS = 256


class FeedbackVerdict(BaseModel):
    """What a person decided about a post. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    post_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_POST_ID_CHARS)] = Field(
        description="The `post_id` of the post (and of its sentiment event).")
    label: Label = Field(description="The label a person gave the post.")
    reviewer: Annotated[StrictStr, Field(max_length=MAX_REVIEWER_CHARS)] | None = Field(
        default=None, description="Who gave it (an id or a name), optional.")
    # strict JSON validation takes exactly an RFC 3339 string here (no number)
    reviewed_at: AwareDatetime | None = Field(default=None, description="When, RFC 3339, optional.")


def decode_verdict(value: bytes | None, *, max_bytes: int = MAX_VERDICT_BYTES) -> FeedbackVerdict:
    """Parse and validate one feedback record's value; `BadRecord` (code `invalid_verdict`, or `null_value`,
    `too_large`) with the reason when it is not a verdict."""
    if value is None:
        raise BadRecord("null_value", "the record has no value (a tombstone), not a verdict")
    if len(value) > max_bytes:
        raise BadRecord("too_large", f"the record is {len(value)} bytes, more than {max_bytes}")
    try:
        return FeedbackVerdict.model_validate_json(value)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(record)'}: {e['msg']}"
                            for e in exc.errors(include_url=False, include_input=False))
        raise BadRecord("invalid_verdict", reasons[:500]) from None
    except Exception as exc:  # whatever else the parser raises is the record's fault
        raise BadRecord("invalid_verdict", f"{type(exc).__name__}: {str(exc)[:300]}") from None
