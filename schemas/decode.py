"""Turning untrusted record bytes into a `PostEvent`, or into a precise, typed reason why not.

Every failure is a `BadRecord` with a stable `code` (for the dead letter and the metrics) and a message that
names the field and the rule. Nothing here raises anything else, whatever the bytes:

    bytes ──▶ size ──▶ UTF-8 ──▶ nesting depth ──▶ json.loads ──────────▶ object? ──▶ PostEvent ──▶ lone surrogates
              too_large  invalid_utf8  too_deep    invalid_json            not_an_object  invalid_post   invalid_post
                                                   (NaN/Infinity literals,
                                                    numbers past Python's
                                                    int-digit limit, ...)

The two third-party steps (the JSON parser, pydantic) are caught broadly: whatever they raise is the record's fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas.models import DEFAULT_MAX_TEXT_CHARS, PostEvent

# A record is a post, a few KB; anything far larger is refused before parsing so that no input can make the
# decoder spend unbounded time or memory.
DEFAULT_MAX_RECORD_BYTES = 1024 * 1024
# Nesting deeper than this is refused before json.loads, which would otherwise recurse into it.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class BadRecord(Exception):
    """Why a record is not a post. `code` is stable; `message` is for a person."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _nesting_depth_exceeds(text: str, limit: int) -> bool:
    depth = 0
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        field = ".".join(str(loc) for loc in item["loc"]) or "(record)"
        parts.append(f"{field}: {item['msg']}")
    return "; ".join(parts)


def decode_post(
    value: bytes | None,
    *,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> PostEvent:
    """Parse and validate one record value; raise `BadRecord` with a clear reason when it is not a post."""
    if value is None:
        raise BadRecord("null_value", "the record has no value (a tombstone), not a post")
    if len(value) > max_record_bytes:
        raise BadRecord("too_large", f"the record is {len(value)} bytes, more than {max_record_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("invalid_utf8", f"the record is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if _nesting_depth_exceeds(text, MAX_JSON_DEPTH):
        raise BadRecord("too_deep", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except Exception as exc:  # JSONDecodeError, RecursionError, ValueError past the int-digit limit, ...
        raise BadRecord("invalid_json", f"the record is not JSON: {str(exc)[:300]}") from None
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"the record is JSON {type(obj).__name__}, not an object")
    try:
        post = PostEvent.model_validate(obj, context={"max_text_chars": max_text_chars})
    except ValidationError as exc:
        raise BadRecord("invalid_post", _format_validation_error(exc)) from None
    except Exception as exc:  # a validator tripping on a value pydantic did not foresee
        raise BadRecord("invalid_post", f"{type(exc).__name__}: {str(exc)[:300]}") from None
    for field_name in ("post_id", "text", "image_url"):
        field_value = getattr(post, field_name)
        if isinstance(field_value, str) and _has_lone_surrogate(field_value):
            # JSON "\ud800" escapes decode to lone surrogates that cannot be re-encoded as UTF-8 on output.
            raise BadRecord("invalid_post", f"{field_name}: contains a lone UTF-16 surrogate")
    return post


def _refuse_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity` are not JSON (RFC 8259), though Python's parser takes them."""
    raise ValueError(f"{name} is not a JSON number")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
