"""Unit tests of admission: the id rule applied, defaults resolved, precise rejections."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from vigil import codec
from vigil.environments import Environment
from vigil_scheduler.admission import Admit, Reject, admit, failed_state, tenant_of, unreadable
from vigil_scheduler.environments import named
from vigil_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONF = SchedulerSettings(default_image="img:1", default_timeout_s=60, default_max_attempts=2)


def run(spec: dict | bytes, subject: str = "vigil.submit.acme", msg_id: str | None = None,
        seq: int = 10) -> Admit | Reject:
    data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    return admit(data, subject, msg_id, seq, NOW, CONF)


def test_admit_resolves_defaults_and_id() -> None:
    result = run({"command": ["true"]}, msg_id="m-1")
    assert isinstance(result, Admit)
    assert result.state.id == "m-1" and result.state.status == "queued"
    assert result.state.tenant == "acme" and result.state.submit_seq == 10
    spec = result.work.spec
    assert spec.image == "img:1" and spec.timeout_s == 60 and spec.max_attempts == 2
    assert spec.id == "m-1"


def test_spec_values_win_over_defaults() -> None:
    result = run({"command": ["true"], "image": "mine:2", "timeout_s": 5, "max_attempts": 7,
                  "id": "own"})
    assert isinstance(result, Admit)
    assert (result.work.spec.image, result.work.spec.timeout_s,
            result.work.spec.max_attempts, result.state.id) == ("mine:2", 5, 7, "own")


@pytest.mark.parametrize("subject", ["vigil.submit", "vigil.submit.a.b", "vigil.submit.a b",
                                     "other.submit.acme"])
def test_bad_subject_rejected(subject: str) -> None:
    result = run({"command": ["true"]}, subject=subject)
    assert isinstance(result, Reject) and result.field == "subject"
    assert failed_state(result, 10, NOW) is None  # no tenant: nowhere to record a state


def test_rejection_salvages_a_valid_spec_id() -> None:
    result = run({"id": "keep-me", "command": "not a list"}, msg_id="m")
    assert isinstance(result, Reject)
    assert result.task_id == "keep-me" and result.field == "$.command"
    state = failed_state(result, 10, NOW)
    assert state is not None and state.status == "failed" and "$.command" in (state.error or "")


def test_rejection_of_bad_id_falls_back_to_rule() -> None:
    result = run({"id": "no good", "command": ["true"]})
    assert isinstance(result, Reject) and result.task_id == "s10" and result.field == "$.id"


def test_tenant_of() -> None:
    assert tenant_of("vigil.submit.acme") == "acme"
    assert tenant_of("vigil.submit.acme.gateway") == "acme"
    assert tenant_of("vigil.submit.acme.other") is None
    assert tenant_of("vigil.submit.") is None


def test_only_the_gateways_subject_may_bring_platform_shaped_ids() -> None:
    platform_id = b'{"id": "s5", "command": ["true"]}'
    assert isinstance(admit(platform_id, "vigil.submit.acme.gateway", None, 9, NOW,
                            SchedulerSettings()), Admit)
    # Not a tenant's own subject, even a tenant called "gateway".
    for subject in ("vigil.submit.acme", "vigil.submit.gateway"):
        refused = admit(platform_id, subject, None, 9, NOW, SchedulerSettings())
        assert isinstance(refused, Reject) and refused.field == "$.id", subject


def test_invalid_utf8_is_refused_under_the_rule_s_id_as_not_json() -> None:
    # Not JSON (RFC 8259: UTF-8), so there is no spec id to salvage: the rule's id.
    result = run(b'{"id": "mine", "command": ["\xff"]}', msg_id="m-2")
    assert isinstance(result, Reject)
    assert result.task_id == "m-2" and result.tenant == "acme" and result.field == "$"
    assert "not UTF-8" in result.error
    state = failed_state(result, 10, NOW)
    assert state is not None and state.status == "failed" and state.refused_at_admission


def test_a_spec_out_of_the_time_window_is_refused_at_admission() -> None:
    result = run({"id": "far", "command": ["true"], "not_before": "9999-12-31T00:00:00Z",
                  "queue_timeout_s": 86_400})
    assert isinstance(result, Reject) and result.task_id == "far"
    assert result.field == "$.not_before"


def test_admission_that_crashes_is_a_rejection_not_a_retry() -> None:
    result = unreadable("vigil.submit.acme", None, 12, KeyError("x"))
    assert result.task_id == "s12" and result.tenant == "acme"
    assert "KeyError('x')" in result.error and "bug" in result.error
    assert unreadable("vigil.submit", "m", 12, KeyError("x")).task_id is None


def _env(**kw: object) -> Environment:
    base = Environment(name="e", tenant="acme", created_at=NOW, updated_at=NOW)
    return msgspec.structs.replace(base, **kw)


def test_a_task_naming_an_environment_takes_its_defaults() -> None:
    data = json.dumps({"command": ["true"], "environment": "e", "secrets": {"A": "mine"}})
    found = {"e": _env(image="localhost/e:1", secrets={"A": "theirs", "B": "b"})}
    result = admit(data.encode(), "vigil.submit.acme", None, 10, NOW, CONF, found)
    assert isinstance(result, Admit)
    spec = result.work.spec
    assert (spec.image, spec.secrets, spec.environment) == (
        "localhost/e:1", {"A": "mine", "B": "b"}, "e")
    # The digest is of the spec as submitted (an Idempotency-Key compares bodies).
    assert result.state.spec_digest == codec.spec_digest(codec.decode_spec(data.encode()))


def test_an_unknown_environment_is_refused_naming_the_field() -> None:
    result = admit(b'{"command": ["true"], "environment": "nope", "id": "t1"}',
                   "vigil.submit.acme", None, 10, NOW, CONF, {})
    assert isinstance(result, Reject) and result.field == "$.environment"
    assert result.task_id == "t1"
    assert "tenant acme has no environment 'nope'" in result.error


def test_the_environment_a_submission_names_is_peeked_cheaply() -> None:
    assert named(b'{"command": ["x"], "environment": "e"}') == "e"
    assert named(b'{"command": ["x"]}') is None
    assert named(b'{"environment": "no good"}') is None
    assert named(b'{"environment": 3}') is None
    assert named(b"\xff not json") is None
