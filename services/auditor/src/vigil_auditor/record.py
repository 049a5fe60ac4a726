"""Turning a message on ``vigil.issues.<source>.<severity>`` into a stored record.

Anyone may publish a confession, so nothing is trusted: the subject must have exactly a
source and a severity, the body must be a JSON confession with ``summary`` and
``severity``. Whatever arrives is recorded (an invalid one with its error and a prefix of
the raw body) so that a complaint is never silently lost. The record's id is, in order:
the confession's ``id``, the ``Nats-Msg-Id`` header, or ``seq-<stream sequence>``. The
first message with an id is its record (and is triaged); a later message with the same id
repeats it and is not triaged (:func:`repeats`), while the same message seen again (a
redelivery, a replay) is still that confession. A confession whose triage was given up
(its record carries :data:`TRIAGE_FAILED_NOTE`) was never triaged: the next message with
its id — a re-publish once the cause is fixed — takes its place and is triaged, once.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec

from vigil import codec, ids, subjects
from vigil.messages import SEVERITIES, ConfessionRecord

RAW_PREFIX = 2_000
# How the auditor's note on a record whose triage it gave up begins (``record.error``).
TRIAGE_FAILED_NOTE = "triage failed after"


def record_id(confession_id: str | None, msg_id: str | None, seq: int,
              source: str = "") -> str:
    """A KV-safe key, scoped by source (so an agent cannot overwrite the platform's
    evidence by reusing an id): ``<source>.<id>``, the id hashed when it is not KV-safe;
    ``seq-<n>`` when the message has no id at all."""
    scope = source if ids.is_valid_id(source) else "unknown"
    for candidate in (confession_id, msg_id):
        if candidate:
            if ids.is_valid_id(candidate):
                return f"{scope}.{candidate}"
            return f"{scope}.h" + hashlib.sha256(candidate.encode()).hexdigest()[:40]
    return f"seq-{seq}"


def to_record(
    subject: str, data: bytes, msg_id: str | None, seq: int, now: datetime
) -> ConfessionRecord:
    parts = subject.split(".")
    source = parts[2] if len(parts) > 2 else ""
    severity = parts[3] if len(parts) > 3 else ""
    problems = []
    if len(parts) != 4 or f"{parts[0]}.{parts[1]}" != subjects.ISSUES:
        problems.append(f"subject {subject!r} is not {subjects.ISSUES}.<source>.<severity>")
    elif severity not in SEVERITIES:
        problems.append(f"subject severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    try:
        confession = codec.confession_decoder.decode(data)
    except msgspec.DecodeError as exc:
        message, field = codec.error_field(exc)
        where = f" (at {field})" if field else ""
        problems.append(f"not a valid confession: {message}{where}")
        return ConfessionRecord(
            id=record_id(None, msg_id, seq, source), source=source, severity=severity,
            subject=subject,
            stream_seq=seq, received_at=now, error="; ".join(problems),
            raw=data[:RAW_PREFIX].decode("utf-8", errors="replace"),
        )
    if confession.severity != severity and not problems:
        # The body is the authority on severity; note the mismatch, keep the body's.
        problems.append(f"subject severity {severity!r} differs from body {confession.severity!r}")
    return ConfessionRecord(
        id=record_id(confession.id, msg_id, seq, source),
        source=source,
        severity=confession.severity,
        subject=subject,
        stream_seq=seq,
        received_at=now,
        confession=confession,
        error="; ".join(problems) or None,
    )


def triage_given_up(record: ConfessionRecord) -> bool:
    """Whether the auditor gave up triaging ``record`` (``triage_given_up_after``).
    Records written before that field (0.3.0 and older) said it only in their error, as
    :data:`TRIAGE_FAILED_NOTE`: read that way until they expire with the bucket's TTL."""
    if record.triage_given_up_after is not None:
        return True
    return any(part.startswith(TRIAGE_FAILED_NOTE) for part in (record.error or "").split("; "))


def repeats(existing: ConfessionRecord, record: ConfessionRecord) -> bool:
    """Whether ``record`` repeats a confession already recorded as ``existing`` from another
    stream message (the same id published again): it must not be counted again. The same
    stream message seen again is no repeat: its triage may not have finished. Nor is
    another message with the id of a confession whose triage was given up: that one was
    never triaged, so its re-publish (the way to retry it) must be."""
    return existing.stream_seq != record.stream_seq and not triage_given_up(existing)
