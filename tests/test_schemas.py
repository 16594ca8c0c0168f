"""The wire contracts: pydantic models, the checked-in JSON Schemas, and the record decoder."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path
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


def test_schema_command_prints_every_message(capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    from consumer.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)) == {"post", "sentiment_event", "dead_letter", "feedback"}


CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md"


def _contract() -> str:
    if not CONTRACT.is_file():
        pytest.skip(f"{CONTRACT} is not beside the checkout")
    return CONTRACT.read_text()


def test_every_field_the_contract_names_for_an_event_and_its_alert_is_in_the_schema() -> None:
    text = _contract()
    table = text.split("### Output: a sentiment event", 1)[1].split("###", 1)[0]
    fields = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    alert = re.search(r"also carries `alert`: `\{(.*?)\}`", text, flags=re.DOTALL)
    assert alert is not None, "the contract's alert object is not where this test looks"
    alert_fields = re.findall(r'"(\w+)":', alert.group(1))
    assert {"modalities_agree", "language", "language_supported"} <= set(fields)
    assert alert_fields == ["rule", "label", "probability", "threshold", "min_precision", "calibration"]
    schema = json_schemas()["sentiment_event"]
    assert set(fields) | {"alert"} <= set(schema["properties"]), set(fields) - set(schema["properties"])
    assert set(alert_fields) == set(schema["$defs"]["Alert"]["properties"])
    assert set(alert_fields) == set(schema["$defs"]["Alert"]["required"])  # nullable, never left out


def _event(**fields: Any) -> SentimentEvent:
    return SentimentEvent.model_validate({
        "post_id": "p-1", "label": "negative", "scores": {"negative": 0.8, "neutral": 0.1, "positive": 0.1},
        "image_status": "ok", "model": {"name": "m", "version": "1"},
        "source": {"topic": "posts", "partition": 0, "offset": 3}, "scored_at": datetime.now(UTC), **fields,
    })


def test_an_alert_record_and_the_new_fields_validate_and_their_nulls_are_written() -> None:
    schema = json_schemas()["sentiment_event"]
    alert = {"rule": "min_precision", "label": "negative", "probability": 0.8, "threshold": 0.69,
             "min_precision": 0.8, "calibration": "a4e9" * 16}
    written = json.loads(_event(modalities_agree=False, language="es", language_supported=False,
                                alert=alert).to_json_bytes())
    jsonschema.Draft202012Validator(schema).validate(written)
    assert written["alert"] == alert and written["language"] == "es" and written["modalities_agree"] is False
    plain = json.loads(_event().to_json_bytes())
    jsonschema.Draft202012Validator(schema).validate(plain)
    assert "alert" not in plain and plain["scores_by_modality"] == {}
    assert plain["modalities_agree"] is None and plain["language"] is None and plain["language_supported"] is True


@pytest.mark.parametrize(
    "fields",
    [{"language": "eng"}, {"language": "EN"}, {"modalities_agree": "yes"},
     {"alert": {"rule": "whim", "label": "negative", "probability": 0.8, "threshold": 0.5, "min_precision": None,
                "calibration": None}},
     {"alert": {"rule": "min_probability", "label": "negative", "probability": 0.8, "threshold": 0.5}}],
    ids=["three-letters", "upper-case", "agree-string", "unknown-rule", "alert-nulls-left-out"],
)
def test_new_fields_refuse_what_the_contract_does_not_allow(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _event(**fields)
    event = json.loads(_event().to_json_bytes()) | fields
    assert list(jsonschema.Draft202012Validator(json_schemas()["sentiment_event"]).iter_errors(event))


def test_an_event_written_before_the_new_fields_still_reads() -> None:
    old = {"schema_version": 1, "post_id": "p", "label": "neutral",
           "scores": {"negative": 0.2, "neutral": 0.6, "positive": 0.2}, "image_status": "none",
           "model": {"name": "m", "version": "1"}, "source": {"topic": "posts", "partition": 0, "offset": 0},
           "scored_at": "2026-12-01T00:00:00Z", "scores_by_modality": {}}
    jsonschema.Draft202012Validator(json_schemas()["sentiment_event"]).validate(old)
    event = SentimentEvent.model_validate_json(json.dumps(old))
    assert (event.modalities_agree, event.language, event.language_supported, event.alert) == (None, None, True, None)
