"""Encoders and decoders, built once (msgspec's fast path) and shared by every service."""

from __future__ import annotations

import hashlib
import re

import msgspec

from vigil.errors import InvalidTask
from vigil.messages import (
    AnyEvent,
    Confession,
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
any_decoder = msgspec.json.Decoder()

_AT = re.compile(r" - at (?:`key` in )?`(\$[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def error_field(exc: msgspec.DecodeError | ValueError) -> tuple[str, str | None]:
    """Split msgspec's ``"Expected … - at `$.command[0]`"`` into (message, "$.command[0]").

    For a missing or unknown field the path names that field itself (``$.command``), not
    the object that lacks or has it.
    """
    text = str(exc)
    match = _AT.search(text)
    message, path = (text, None) if match is None else (text[: match.start()], match.group(1))
    named = _NAMED.search(message)
    if named is not None:
        path = f"{path or '$'}.{named.group(1)}"
    elif path is None and isinstance(exc, msgspec.ValidationError):
        path = "$"
    return message, path


_AT_FIELD = re.compile(r"\(at (\$[^\s)]*)\)\s*$")


def invalid_task_field(error: str) -> str | None:
    """The JSON path a recorded rejection by :func:`decode_spec` names (``invalid task
    spec: … (at $.env)``), ``$`` for a body that is not JSON, else None (a refusal of the
    whole task): how the gateway names the field of a spec the scheduler refused."""
    match = _AT_FIELD.search(error)
    if match is not None:
        return match.group(1)
    if error.startswith("task spec is not valid JSON"):
        return "$"
    return None


def spec_digest(spec: TaskSpec) -> str:
    """``sha256:<hex>`` of ``spec`` as submitted, without its id: the same request body
    gives the same digest at the gateway and the scheduler (one encoder, fields in order)."""
    canonical = encode(msgspec.structs.replace(spec, id=None))
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def decode_spec(data: bytes, *, strict: bool = False) -> TaskSpec:
    """Decode and validate a task spec, raising :class:`InvalidTask` naming the field."""
    try:
        if strict:
            spec: TaskSpec = spec_strict_decoder.decode(data)
        else:
            spec = spec_decoder.decode(data)
    except msgspec.ValidationError as exc:
        message, field = error_field(exc)
        where = f" (at {field})" if field else ""
        raise InvalidTask(f"invalid task spec: {message}{where}", field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidTask(f"task spec is not valid JSON: {exc}", field="$",
                          malformed=True) from None
    return spec

