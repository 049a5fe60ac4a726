"""Encoders and decoders, built once (msgspec's fast path) and shared by every service."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import TypeVar

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

T = TypeVar("T")

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


def spec_digest(spec: TaskSpec) -> str:
    """``sha256:<hex>`` of ``spec`` as submitted, without its id: the same request body
    gives the same digest at the gateway and the scheduler (one encoder, fields in order)."""
    canonical = encode(msgspec.structs.replace(spec, id=None))
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def check_utf8(data: bytes) -> None:
    """Raise :class:`msgspec.DecodeError` unless ``data`` is UTF-8, as JSON must be
    (RFC 8259). msgspec checks only the strings it decodes (not those it skips), and
    raises UnicodeDecodeError for those, which is no DecodeError: callers would crash."""
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(
            f"the body is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _integral(value: object) -> object:
    """``value`` with every float that is a whole number (``2.0``) made an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def decode_body(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a request body as ``decoder`` does, taking a whole number written as a float
    (``2.0``) as an integer, as JSON Schema does; raises msgspec's DecodeError (not
    UTF-8, not JSON) or ValidationError (naming the field)."""
    check_utf8(data)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError:
        # The slow path, only for a body the fast one refused: it may hold a `2.0`.
        value: T = msgspec.convert(_integral(any_decoder.decode(data)), decoder.type)
        return value


def decode_spec(data: bytes, *, strict: bool = False, now: datetime | None = None) -> TaskSpec:
    """Decode and validate a task spec, raising :class:`InvalidTask` naming the field.

    ``now``: the spec is being submitted at that time; the rules that depend on it
    (:meth:`TaskSpec.check_at`) apply too. A whole number written as a float (``2.0``)
    is an integer, as in JSON Schema (the OpenAPI document says ``integer``).
    """
    decoder = spec_strict_decoder if strict else spec_decoder
    try:
        check_utf8(data)
        try:
            spec: TaskSpec = decoder.decode(data)
        except msgspec.ValidationError:
            # The slow path, only for a spec the fast one refused: it may hold a `2.0`.
            # Any other error is raised again, the same as the fast path's.
            spec = msgspec.convert(_integral(any_decoder.decode(data)), decoder.type)
        if now is not None:
            spec.check_at(now)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:  # (a ValueError too, hence first)
        raise InvalidTask(f"task spec is not valid JSON: {exc}", field="$",
                          malformed=True) from None
    except ValueError as exc:
        raise _invalid(exc) from None
    return spec


def _invalid(exc: msgspec.ValidationError | ValueError) -> InvalidTask:
    message, field = error_field(exc)
    where = f" (at {field})" if field else ""
    return InvalidTask(f"invalid task spec: {message}{where}", field=field)

