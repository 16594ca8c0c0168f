"""JSON Schema documents generated from the pydantic models; the checked-in copies live in `schemas/json/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.feedback import FeedbackVerdict
from schemas.models import DeadLetter, PostEvent, SentimentEvent

_MODELS: dict[str, type[BaseModel]] = {
    "post": PostEvent, "sentiment_event": SentimentEvent, "dead_letter": DeadLetter, "feedback": FeedbackVerdict,
}
# what mmsent reads (its schema says what it accepts); the others are what it emits
_INPUTS = (PostEvent, FeedbackVerdict)
CHECKED_IN_DIR = Path(__file__).parent / "json"


def json_schemas() -> dict[str, dict[str, Any]]:
    """name -> JSON Schema (draft 2020-12) of each wire message."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in _MODELS.items():
        # Validation mode for the input (what we accept), serialization mode for what we emit.
        schema = model.model_json_schema(mode="validation" if model in _INPUTS else "serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://mmsent.dev/schemas/v1/{name}.json"
        schemas[name] = schema
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = CHECKED_IN_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.json"
        path.write_text(render(schema))
        written.append(path)
    return written
