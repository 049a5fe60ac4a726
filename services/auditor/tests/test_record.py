"""Unit tests: any message on the issues stream becomes a record, never a crash."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from vigil_auditor.record import (
    TRIAGE_FAILED_NOTE,
    record_id,
    repeats,
    to_record,
    triage_given_up,
)

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_valid_confession() -> None:
    body = json.dumps({"summary": "disk full", "severity": "error", "id": "c-1",
                       "task_id": "t"}).encode()
    rec = to_record("vigil.issues.agent.error", body, None, 4, NOW)
    assert rec.id == "agent.c-1" and rec.source == "agent" and rec.severity == "error"
    assert rec.confession is not None and rec.confession.task_id == "t" and rec.error is None


def test_invalid_confession_is_kept_with_its_error() -> None:
    rec = to_record("vigil.issues.human.warning", b'{"severity": "warning"}', "m-1", 5, NOW)
    assert rec.confession is None and rec.id == "human.m-1"
    assert "summary" in (rec.error or "") and rec.raw == '{"severity": "warning"}'
    rec = to_record("vigil.issues.x", b"garbage", None, 6, NOW)
    assert rec.id == "seq-6" and "not vigil.issues.<source>.<severity>" in (rec.error or "")


def test_severity_mismatch_is_noted() -> None:
    rec = to_record("vigil.issues.agent.info", b'{"summary": "s", "severity": "critical"}',
                    None, 7, NOW)
    assert rec.severity == "critical" and "differs" in (rec.error or "")


def test_record_ids_are_kv_safe_and_scoped_by_source() -> None:
    assert record_id("ok-id", None, 1, "agent") == "agent.ok-id"
    assert record_id("ok-id", None, 1, "executor") == "executor.ok-id"
    weird = record_id("has spaces/and.dots", None, 1, "agent")
    assert weird.startswith("agent.h") and " " not in weird and weird.count(".") == 1
    assert record_id(None, None, 9) == "seq-9"


def test_the_subject_names_the_source_not_the_body() -> None:
    body = json.dumps({"summary": "s", "severity": "error", "source": "executor",
                       "id": "executor-t-a1-oom"}).encode()
    rec = to_record("vigil.issues.agent.error", body, None, 1, NOW)
    assert rec.source == "agent" and rec.id == "agent.executor-t-a1-oom"


def test_a_repeat_is_another_message_with_the_same_id() -> None:
    body = json.dumps({"id": "h1", "summary": "disk full", "severity": "error"}).encode()
    first = to_record("vigil.issues.human.error", body, None, 10, NOW)
    again = to_record("vigil.issues.human.error", body, None, 11, NOW)  # published twice
    redelivered = to_record("vigil.issues.human.error", body, None, 10, NOW)
    assert first.id == again.id == "human.h1"
    assert repeats(first, again)
    assert not repeats(first, redelivered)  # the same message: its triage must finish


def test_a_confession_given_up_is_not_repeated_by_its_re_publish() -> None:
    body = json.dumps({"id": "p1", "summary": "disk full", "severity": "error"}).encode()
    first = to_record("vigil.issues.agent.error", body, None, 10, NOW)
    noted = msgspec.structs.replace(first, error="triage failed: boom",
                                    triage_given_up_after=3)
    copy = to_record("vigil.issues.agent.error", body, None, 12, NOW)
    assert triage_given_up(noted) and not triage_given_up(first)
    assert repeats(first, copy)  # triaged: a copy counts nothing
    assert not repeats(noted, copy)  # never triaged: the copy is, once
    invalid = msgspec.structs.replace(noted, error=f"bad subject; {noted.error}")
    assert triage_given_up(invalid)
    # An agent cannot fake the note: what it sends is its summary, not the record's error.
    faked = to_record("vigil.issues.agent.error", json.dumps(
        {"id": "p1", "summary": f"{TRIAGE_FAILED_NOTE} 3", "severity": "error"}).encode(),
        None, 10, NOW)
    assert not triage_given_up(faked)
    # A record an older auditor wrote says it only in its error.
    legacy = msgspec.structs.replace(first, error=f"{TRIAGE_FAILED_NOTE} 3 deliveries: boom")
    assert triage_given_up(legacy)
