"""Encoders and decoders, built once (msgspec's fast path) and shared by every service."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from vigil.errors import InvalidTask
from vigil.messages import (
    AnyEvent,
    Confession,
    ConfessionRecord,
    TaskSpec,
    TaskSpecStrict,
    TaskState,
    WorkItem,
)

encoder = msgspec.json.Encoder()
encode = encoder.encode

spec_decoder = msgspec.json.Decoder(TaskSpec)
spec_strict_decoder = msgspec.json.Decoder(TaskSpecStrict)
state_decoder = msgspec.json.Decoder(TaskState)
work_decoder = msgspec.json.Decoder(WorkItem)
event_decoder = msgspec.json.Decoder(AnyEvent)
confession_decoder = msgspec.json.Decoder(Confession)
confession_record_decoder = msgspec.json.Decoder(ConfessionRecord)
any_decoder = msgspec.json.Decoder()

_AT = re.compile(r" - at `(\$[^`]*)`$")


def error_field(exc: msgspec.DecodeError | ValueError) -> tuple[str, str | None]:
    """Split msgspec's ``"Expected … - at `$.command[0]`"`` into (message, "$.command[0]")."""
    text = str(exc)
    match = _AT.search(text)
    if match is None:
        return text, None
    return text[: match.start()], match.group(1)


def decode_spec(data: bytes, *, strict: bool = False) -> TaskSpec:
    """Decode and validate a task spec, raising :class:`InvalidTask` naming the field."""
    try:
        if strict:
            spec: TaskSpec = spec_strict_decoder.decode(data)
        else:
            spec = spec_decoder.decode(data)
    except msgspec.ValidationError as exc:
        message, field = error_field(exc)
        raise InvalidTask(f"invalid task spec: {message}", field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidTask(f"task spec is not valid JSON: {exc}", field="$") from None
    return spec


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)
