"""The wire contracts: pydantic models, the checked-in JSON Schemas, and the record decoder."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from schemas import BadRecord, DeadLetter, PostEvent, SentimentEvent, SourceCoordinates, decode_post, json_schemas
from schemas.export import CHECKED_IN_DIR, render

GOOD_POST: dict[str, Any] = {
    "post_id": "p-1",
    "text": "what a day 🌞 @friend http://t.co/x",
    "image_url": "https://images.example/cat.jpg",
    "created_at": "2026-11-28T00:26:09Z",
    "unknown_extra": {"kept": "out"},
}

BAD_POSTS: list[tuple[str, dict[str, Any], str]] = [
    ("no post_id", {"text": "hi"}, "post_id"),
    ("empty post_id", {"post_id": "", "text": "hi"}, "post_id"),
    ("post_id too long", {"post_id": "x" * 257}, "post_id"),
    ("numeric post_id", {"post_id": 7}, "post_id"),
    ("non-string text", {"post_id": "p", "text": 42}, "text"),
    ("text too long", {"post_id": "p", "text": "a" * 10_001}, "text"),
    ("image_url too long", {"post_id": "p", "image_url": "https://a/" + "b" * 2048}, "image_url"),
    ("image_url not a string", {"post_id": "p", "image_url": ["x"]}, "image_url"),
    ("created_at not RFC 3339", {"post_id": "p", "created_at": "yesterday"}, "created_at"),
]


@pytest.fixture(scope="module")
def post_schema() -> dict[str, Any]:
    return json.loads((CHECKED_IN_DIR / "post.json").read_text())


def test_checked_in_schemas_match_the_models() -> None:
    for name, schema in json_schemas().items():
        path = CHECKED_IN_DIR / f"{name}.json"
        assert path.exists(), f"{path} is missing: run `make schemas`"
        assert path.read_text() == render(schema), f"{path} drifted from the models: run `make schemas`"


def test_good_post_passes_model_and_schema(post_schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(post_schema).validate(GOOD_POST)
    post = PostEvent.model_validate(GOOD_POST)
    assert post.post_id == "p-1"
    assert post.created_at == datetime(2026, 11, 28, 0, 26, 9, tzinfo=UTC)
    assert "unknown_extra" not in post.model_dump()


@pytest.mark.parametrize(("case", "post", "field"), BAD_POSTS, ids=[case for case, _, _ in BAD_POSTS])
def test_bad_post_fails_with_a_field_level_error(
    post_schema: dict[str, Any], case: str, post: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as model_error:
        PostEvent.model_validate(post)
    assert field in {str(e["loc"][0]) for e in model_error.value.errors()}

    if field != "created_at":  # JSON Schema's "format" is an annotation, not an assertion, by default
        errors = list(jsonschema.Draft202012Validator(post_schema).iter_errors(post))
        assert errors, f"the JSON Schema accepted: {case}"
        assert any(field in (list(e.path) or [e.message.split("'")[1]]) for e in errors), [e.message for e in errors]

    with pytest.raises(BadRecord) as decode_error:
        decode_post(json.dumps(post).encode())
    assert decode_error.value.code == "invalid_post"
    assert field in decode_error.value.message


def test_text_limit_is_configurable() -> None:
    post = json.dumps({"post_id": "p", "text": "a" * 50}).encode()
    assert decode_post(post, max_text_chars=50).text == "a" * 50
    with pytest.raises(BadRecord, match="more than the limit of 49"):
        decode_post(post, max_text_chars=49)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "null_value"),
        (b"\xff\xfe not utf8", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b"[" * 10_000 + b"]" * 10_000, "too_deep"),
        (b'{"post_id": "\\ud800"}', "invalid_post"),
        (b" " * (1024 * 1024 + 1), "too_large"),
    ],
    ids=["null", "utf8", "json", "array", "string", "deep", "surrogate", "large"],
)
def test_decoder_names_what_is_wrong(value: bytes | None, code: str) -> None:
    with pytest.raises(BadRecord) as error:
        decode_post(value)
    assert error.value.code == code
    assert error.value.message


def test_sentiment_event_and_dead_letter_validate_against_their_schemas() -> None:
    source = SourceCoordinates(topic="posts", partition=2, offset=17)
    event = SentimentEvent.model_validate(
        {
            "post_id": "p-1",
            "label": "positive",
            "scores": {"negative": 0.1, "neutral": 0.2, "positive": 0.7},
            "image_status": "ok",
            "model": {"name": "mmsent-default", "version": "1"},
            "source": {"topic": "posts", "partition": 2, "offset": 17},
            "scored_at": datetime.now(UTC),
        }
    )
    dead = DeadLetter.for_record(code="invalid_json", message="nope", source=source, value=b"\x00{", key=b"k")
    schemas = json_schemas()
    jsonschema.Draft202012Validator(schemas["sentiment_event"]).validate(json.loads(event.to_json_bytes()))
    jsonschema.Draft202012Validator(schemas["dead_letter"]).validate(json.loads(dead.to_json_bytes()))
    assert dead.original_value() == b"\x00{"
    assert base64.b64decode(dead.key_b64 or "") == b"k"
    assert json.loads(event.to_json_bytes())["schema_version"] == 1


def test_scores_must_sum_to_one() -> None:
    with pytest.raises(ValidationError, match="sum to 1"):
        SentimentEvent.model_validate(
            {
                "post_id": "p",
                "label": "positive",
                "scores": {"negative": 0.5, "neutral": 0.5, "positive": 0.5},
                "image_status": "none",
                "model": {"name": "m", "version": "1"},
                "source": {"topic": "posts", "partition": 0, "offset": 0},
                "scored_at": datetime.now(UTC),
            }
        )


def test_schema_command_prints_all_three(capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    from consumer.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"post", "sentiment_event", "dead_letter"}
