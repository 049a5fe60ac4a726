"""The task spec refuses what could only fail later, naming the field; it takes whatever
JSON Schema (and so the OpenAPI document) calls valid. Unit tests of vigil.codec."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vigil import codec
from vigil.errors import InvalidTask
from vigil.messages import NOT_BEFORE_MAX_AHEAD_DAYS, TaskSpec

pytestmark = pytest.mark.unit
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def refused(spec: dict[str, Any] | bytes, *, now: datetime | None = NOW,
            strict: bool = True) -> InvalidTask:
    data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    with pytest.raises(InvalidTask) as err:
        codec.decode_spec(data, strict=strict, now=now)
    return err.value


@pytest.mark.parametrize(("spec", "field"), [
    ({"command": ["sh", "a\x00b"]}, "$.command[1]"),
    ({"command": ["\x00"]}, "$.command[0]"),
    ({"command": ["true"], "env": {"FOO": "x\x00"}}, "$.env.FOO"),
    ({"command": ["true"], "labels": {"team": "\x00"}}, "$.labels.team"),
    ({"command": ["true"], "labels": {"a.b/c": "\x00"}}, '$.labels["a.b/c"]'),
    ({"command": ["true"], "node_labels": {"gpu": "a\x00"}}, "$.node_labels.gpu"),
    # Names and keys never could hold one (their patterns), nor the image or the pool.
    ({"command": ["true"], "env": {"F\x00O": "x"}}, "$.env"),
    ({"command": ["true"], "image": "img\x00"}, "$.image"),
])
def test_a_nul_byte_is_refused_where_it_is(spec: dict[str, Any], field: str) -> None:
    err = refused(spec)
    assert err.field == field and not err.malformed
    assert field in str(err)


@pytest.mark.parametrize("code", [-1, 256, 2**32, 2**64])
def test_exit_codes_are_0_to_255(code: int) -> None:
    err = refused({"command": ["true"], "retry": {"non_retryable_exit_codes": [3, code]}})
    assert err.field == "$.retry.non_retryable_exit_codes[1]"
    spec = codec.decode_spec(b'{"command": ["true"], "retry": '
                             b'{"non_retryable_exit_codes": [0, 255]}}')
    assert spec.retry is not None and spec.retry.non_retryable_exit_codes == [0, 255]


def test_not_before_is_at_most_a_year_ahead_of_the_submission() -> None:
    limit = NOW + timedelta(days=NOT_BEFORE_MAX_AHEAD_DAYS)
    for late in (limit + timedelta(seconds=1), datetime(9999, 12, 31, 23, 59, tzinfo=UTC)):
        err = refused({"command": ["true"], "not_before": late.isoformat(),
                       "queue_timeout_s": 30 * 86_400})
        assert err.field == "$.not_before" and f"{NOT_BEFORE_MAX_AHEAD_DAYS} days" in str(err)
    ok = codec.decode_spec(json.dumps({"command": ["true"], "not_before": limit.isoformat()})
                           .encode(), now=NOW)
    assert ok.not_before == limit
    # The past is "now"; and a stored spec stays readable whatever the clock says.
    codec.decode_spec(b'{"command": ["true"], "not_before": "0001-01-01T00:00:00+01:00"}',
                      now=NOW)
    codec.decode_spec(b'{"command": ["true"], "not_before": "9999-12-31T00:00:00Z"}')


@pytest.mark.parametrize(("body", "where"), [
    (b'{"command": ["\xff"]}', 14),
    (b'{"command": ["true"], "unknown": "\xc3("}', 34),  # skipped by msgspec, still not JSON
    (b'{"command": ["true"]}\xed\xa0\x80', 21),  # an encoded surrogate, after it
])
def test_invalid_utf8_is_malformed_json(body: bytes, where: int) -> None:
    for strict in (True, False):
        err = refused(body, strict=strict)
        assert err.malformed and err.field == "$"
        assert "not UTF-8 (invalid" in str(err) and f"at byte {where})" in str(err)


def test_a_whole_number_written_as_a_float_is_an_integer() -> None:
    """JSON Schema's `integer` takes 2.0; so does the spec (the OpenAPI document says so)."""
    spec = codec.decode_spec(b'{"command": ["true"], "priority": 2.0, "max_attempts": 3e0, '
                             b'"retry": {"non_retryable_exit_codes": [1.0]}}', strict=True)
    assert (spec.priority, spec.max_attempts) == (2, 3)
    assert spec.retry is not None and spec.retry.non_retryable_exit_codes == [1]
    assert isinstance(spec.priority, int)
    for bad, field in ((b'2.5', "$.priority"), (b'"2"', "$.priority"), (b'10.0', "$.priority"),
                       (b'true', "$.priority")):
        err = refused(b'{"command": ["true"], "priority": ' + bad + b"}")
        assert err.field == field, bad
    # Errors elsewhere are reported as they would be without the float.
    assert refused(b'{"priority": 2.0}').field == "$.command"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
WORDS = st.text(min_size=1, max_size=8)
TIMES = (st.datetimes(timezones=st.just(UTC))
         | st.datetimes(min_value=datetime(9999, 12, 1), timezones=st.just(UTC)))
# Mostly valid fields (the interesting specs are the accepted ones), some noise.
SPECS = st.fixed_dictionaries({"command": st.lists(WORDS, min_size=1, max_size=3)}, optional={
    "id": st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z") | JSON,
    "env": st.dictionaries(st.from_regex(r"\A[A-Z]{1,4}\Z"), st.text(max_size=8), max_size=3),
    "labels": st.dictionaries(st.from_regex(r"\A[a-z]{1,4}\Z"), st.text(max_size=8),
                              max_size=3),
    "priority": st.integers(-1, 10) | st.floats(-1, 10),
    "not_before": TIMES.map(datetime.isoformat),
    "queue_timeout_s": st.floats(0.1, 30 * 86_400) | st.just(30 * 86_400),
    "retry": st.fixed_dictionaries({}, optional={
        "non_retryable_exit_codes": st.lists(st.integers(-2**70, 2**70), max_size=3)}),
    "noise": JSON,
}).map(lambda d: {("command" if k == "noise" else k): v for k, v in d.items()})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | SPECS.map(lambda d: json.dumps(d).encode()),
       st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.just(UTC)))
def test_any_input_is_a_spec_or_an_invalid_task(data: bytes, now: datetime) -> None:
    """Never another exception; an accepted spec survives the trip through the scheduler
    (encoded, decoded again) and every time sum made from it is a real time."""
    try:
        spec = codec.decode_spec(data, strict=True, now=now)
    except InvalidTask as err:
        refusal: InvalidTask | None = err
    else:
        refusal = None
    if refusal is not None:
        assert refusal.field is not None or not refusal.malformed
        return
    assert codec.decode_spec(codec.encode(spec), now=now) == msgspec.convert(
        msgspec.to_builtins(spec), TaskSpec)
    start = max(now, spec.not_before or now)
    assert start + timedelta(seconds=spec.queue_timeout_s or 0) < datetime(9999, 1, 1,
                                                                          tzinfo=UTC)
    assert all("\x00" not in s for s in [*spec.command, *spec.env.values(),
                                         *spec.labels.values()])
