"""Unit tests of the public contracts: messages, the id rule, codec errors, settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from vigil import codec, ids, settings, subjects
from vigil.errors import InvalidTask, SettingsError
from vigil.messages import (
    Finished,
    Log,
    TaskSpec,
    TaskState,
)
from vigil.settings import CommonSettings, redact_url

pytestmark = pytest.mark.unit


def test_spec_minimal_and_defaults() -> None:
    spec = codec.decode_spec(b'{"command": ["echo", "hi"]}')
    assert spec.command == ["echo", "hi"]
    assert spec.id is None and spec.image is None and spec.env == {} and spec.pool == "default"


def test_spec_tolerates_unknown_fields_on_the_wire_but_not_strict() -> None:
    data = b'{"command": ["true"], "future_field": 1}'
    assert codec.decode_spec(data).command == ["true"]
    with pytest.raises(InvalidTask) as err:
        codec.decode_spec(data, strict=True)
    assert err.value.field == "$.future_field"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{}', "$.command"),
        (b'{"command": []}', "$.command"),
        (b'{"command": [1]}', "$.command[0]"),
        (b'{"command": ["a"], "id": "x.y"}', "$.id"),
        (b'{"command": ["a"], "id": "' + b"a" * 65 + b'"}', "$.id"),
        (b'{"command": ["a"], "env": {"bad-name": "1"}}', "$.env"),
        (b'{"command": ["a"], "env": {"OK": 1}}', "$.env[...]"),
        (b'{"command": ["a"], "timeout_s": 0}', "$.timeout_s"),
        (b'{"command": ["a"], "max_attempts": 101}', "$.max_attempts"),
        (b'{"command": ["a"], "pool": "a b"}', "$.pool"),
        (b'[]', "$"),
    ],
)
def test_spec_errors_name_the_field(data: bytes, field: str) -> None:
    with pytest.raises(InvalidTask) as err:
        codec.decode_spec(data)
    assert err.value.field == field
    assert not err.value.malformed
    assert field in str(err.value)


def test_malformed_json_is_flagged() -> None:
    with pytest.raises(InvalidTask) as err:
        codec.decode_spec(b"{nope")
    assert err.value.malformed and err.value.field == "$"


def test_reserved_env_is_refused() -> None:
    with pytest.raises(InvalidTask, match="reserved"):
        codec.decode_spec(b'{"command": ["a"], "env": {"VIGIL_ATTEMPT": "9"}}')


@pytest.mark.parametrize(
    ("spec_id", "msg_id", "seq", "expected"),
    [
        ("mine", "msg", 7, "mine"),
        (None, "msg-1", 7, "msg-1"),
        (None, "not valid!", 7, "s7"),
        (None, None, 7, "s7"),
        (None, "", 9, "s9"),
    ],
)
def test_task_id_rule(spec_id: str | None, msg_id: str | None, seq: int, expected: str) -> None:
    assert ids.task_id_for(spec_id, msg_id, seq) == expected


def test_generated_ids_are_valid_and_idempotency_ids_stable() -> None:
    fresh = {ids.new_task_id() for _ in range(100)}
    assert len(fresh) == 100 and all(ids.is_valid_id(i) for i in fresh)
    a = ids.idempotent_task_id("acme", "order-1")
    assert a == ids.idempotent_task_id("acme", "order-1")
    assert a != ids.idempotent_task_id("globex", "order-1")
    assert ids.is_valid_id(a)


def test_state_round_trip_has_the_public_fields() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    state = TaskState(id="t", tenant="acme", status="queued", created_at=now, updated_at=now,
                      spec=TaskSpec(command=["true"]))
    data = json.loads(codec.encode(state))
    for key in ("id", "tenant", "status", "attempt", "executor", "exit_code", "error",
                "created_at", "updated_at"):
        assert key in data
    assert codec.state_decoder.decode(codec.encode(state)) == state


def test_events_are_tagged_by_kind() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ev = Log(task_id="t", attempt=1, time=now, stream="stdout", lines=["a"], first=3)
    data = json.loads(codec.encode(ev))
    assert data["kind"] == "log"
    assert codec.event_decoder.decode(codec.encode(ev)) == ev
    fin = codec.event_decoder.decode(b'{"kind":"finished","task_id":"t","time":'
                                     b'"2026-01-01T00:00:00Z","status":"failed","new":1}')
    assert isinstance(fin, Finished) and fin.final is True


def test_subjects() -> None:
    assert subjects.submit("acme") == "vigil.submit.acme"
    assert subjects.work("gpu") == "vigil.work.gpu"
    assert subjects.submit_via_gateway("acme") == "vigil.submit.acme.gateway"
    assert subjects.event("acme", "t1", "log") == "vigil.events.acme.t1.log"
    assert subjects.issue("agent", "error") == "vigil.issues.agent.error"
    assert subjects.task_events("acme", "t1") == "vigil.events.acme.t1.>"
    assert subjects.event_parts("vigil.events.acme.t1.log") == ("acme", "t1", "log")
    assert subjects.event_parts("vigil.events.t1.log") is None  # the layout before 0.2
    assert subjects.task_key("acme", "t1") == "acme.t1"
    assert subjects.task_kv_subject("acme") == "$KV.vigil-tasks.acme.>"
    assert subjects.timer("start", "acme", "t1") == "vigil.timer.start.acme.t1"
    assert subjects.cancel_notice("acme", "t1") == "vigil.cancel.acme.t1"


class _Conf(CommonSettings, frozen=True, kw_only=True):
    slots: int = 4
    ratio: float = 0.5
    flag: bool = False


def test_settings_from_env_with_types_and_precise_errors(tmp_path) -> None:
    conf = settings.load(_Conf, {"VIGIL_SLOTS": "8", "VIGIL_FLAG": "true",
                                 "VIGIL_NATS_URL": "nats://x:1"})
    assert conf.slots == 8 and conf.flag is True and conf.nats_url == "nats://x:1"
    with pytest.raises(SettingsError, match="VIGIL_SLOTS"):
        settings.load(_Conf, {"VIGIL_SLOTS": "many"})
    config = tmp_path / "vigil.toml"
    config.write_text("slots = 3\nratio = 0.25\n")
    conf = settings.load(_Conf, {"VIGIL_CONFIG_FILE": str(config), "VIGIL_SLOTS": "5"})
    assert conf.slots == 5 and conf.ratio == 0.25  # env beats the file
    config.write_text("slotz = 3\n")
    with pytest.raises(SettingsError, match="slotz"):
        settings.load(_Conf, {"VIGIL_CONFIG_FILE": str(config)})


def test_redact_url_hides_passwords() -> None:
    assert redact_url("nats://svc:s3cret@h:4222") == "nats://svc:***@h:4222"
    assert "s3cret" not in redact_url("nats://a:s3cret@h:1,nats://b:s3cret@h:2")
    assert redact_url("nats://h:4222") == "nats://h:4222"


def test_settings_structs_forbid_unknown_config() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"nope": 1}, CommonSettings)
