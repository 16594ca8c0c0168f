"""The Kafka record headers of the wire contract (`../shared/CONTRACT.md`, "Headers").

Every input header is carried, in order, to the record's event and dead letter (narrowed by the operator's allow-
and deny-lists); mmsent then adds its own:

    event        ... input headers ..., mmsent.model
    dead letter  ... input headers ..., mmsent.error.code, mmsent.error.message, mmsent.source.timestamp
                 (+ mmsent.headers.dropped when input headers were left out for the dead letter to fit)
"""

from __future__ import annotations

MODEL = "mmsent.model"  # name:version of the model that scored the event
ERROR_CODE = "mmsent.error.code"  # the dead letter's stable error code
ERROR_MESSAGE = "mmsent.error.message"  # for a person, cut to MAX_ERROR_MESSAGE_BYTES
SOURCE_TIMESTAMP = "mmsent.source.timestamp"  # the input record's timestamp, ms since the epoch, decimal
HEADERS_DROPPED = "mmsent.headers.dropped"  # how many input headers (the last ones) a dead letter left out, decimal
TRACEPARENT = "traceparent"  # W3C trace context: continued, not copied, when tracing is on

# An input header with one of these names would pass for mmsent's own: it is not carried.
OWN = frozenset({MODEL, ERROR_CODE, ERROR_MESSAGE, SOURCE_TIMESTAMP, HEADERS_DROPPED})
MAX_ERROR_MESSAGE_BYTES = 1_024

Headers = list[tuple[str, str | bytes | None]]  # what confluent-kafka reads and writes
