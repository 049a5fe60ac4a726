"""Unit tests: a task's resources at admission, the tenant's defaults and maxima."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from vigil.errors import InvalidTask
from vigil.messages import Resources
from vigil_scheduler.admission import Admit, Reject, admit
from vigil_scheduler.resources import check_settings, effective, merged
from vigil_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_unset_fields_take_the_default_and_set_ones_stay() -> None:
    default = Resources(memory_mb=512, disk_mb=1024, pids=64)
    got = effective(Resources(memory_mb=2048), "acme", default, Resources())
    assert got == Resources(memory_mb=2048, disk_mb=1024, pids=64)
    assert effective(None, "acme", default, Resources()) == default
    assert effective(None, "acme", Resources(), Resources()) is None  # the node decides


def test_a_field_over_the_maximum_is_refused_naming_it_and_the_maximum() -> None:
    with pytest.raises(InvalidTask) as caught:
        effective(Resources(memory_mb=4096, pids=32), "acme", Resources(),
                  Resources(memory_mb=2048))
    assert caught.value.field == "$.resources.memory_mb"
    assert "resources.memory_mb 4096 MiB is over tenant 'acme''s maximum of 2048 MiB" \
        in str(caught.value)
    assert str(caught.value).endswith("(at $.resources.memory_mb)")
    with pytest.raises(InvalidTask) as caught:
        effective(Resources(cpus=2.5), "acme", Resources(), Resources(cpus=2))
    assert caught.value.field == "$.resources.cpus"
    # At the maximum is allowed.
    assert effective(Resources(memory_mb=2048), "acme", Resources(),
                     Resources(memory_mb=2048)) == Resources(memory_mb=2048)


def test_settings_merge_field_by_field_and_refuse_a_default_over_its_maximum() -> None:
    conf = SchedulerSettings(
        resources_default='{"memory_mb": 512, "pids": 128}',
        resources_max='{"memory_mb": 1024, "disk_mb": 2048}',
        tenant_limits=json.dumps({"acme": {"resources_max": {"memory_mb": 8192},
                                           "resources_default": {"disk_mb": 100}}}))
    acme, other = conf.limits_for("acme"), conf.limits_for("beta")
    assert acme.resources_max == Resources(memory_mb=8192, disk_mb=2048)
    assert acme.resources_default == Resources(memory_mb=512, disk_mb=100, pids=128)
    assert other.resources_max == Resources(memory_mb=1024, disk_mb=2048)
    with pytest.raises(ValueError, match="VIGIL_RESOURCES_DEFAULT: memory_mb 4096 MiB is "
                       "over VIGIL_RESOURCES_MAX's 1024 MiB"):
        SchedulerSettings(resources_default='{"memory_mb": 4096}',
                          resources_max='{"memory_mb": 1024}')
    with pytest.raises(ValueError, match="tenant 'acme' resources_default"):
        SchedulerSettings(resources_max='{"pids": 100}',
                          tenant_limits=json.dumps({"acme": {"resources_default": {
                              "pids": 200}}}))
    with pytest.raises(ValueError, match="VIGIL_RESOURCES_MAX"):
        SchedulerSettings(resources_max='{"memory": 100}')  # unknown field
    with pytest.raises(ValueError, match="VIGIL_TENANT_LIMITS"):
        SchedulerSettings(tenant_limits=json.dumps({"acme": {"resources_max": {
            "memory_mb": 1}}}))  # below what a task may ask for at all
    check_settings(Resources(), Resources(memory_mb=16), default_name="d", max_name="m")
    assert merged(Resources(pids=8), None) == Resources(pids=8)


def test_admission_stores_the_filled_in_resources_and_rejects_over_the_maximum() -> None:
    conf = SchedulerSettings(resources_default='{"memory_mb": 512, "output_mb": 10}',
                             tenant_limits=json.dumps({"acme": {"resources_max": {
                                 "memory_mb": 1024, "output_mb": 50}}}))
    spec = {"id": "t1", "command": ["true"], "resources": {"disk_mb": 300}}
    got = admit(json.dumps(spec).encode(), "vigil.submit.acme", None, 1, NOW, conf)
    assert isinstance(got, Admit)
    assert got.work.spec.resources == Resources(memory_mb=512, disk_mb=300, output_mb=10)
    assert got.state.spec is not None and got.state.spec.resources == got.work.spec.resources
    over = {"id": "t2", "command": ["true"], "resources": {"memory_mb": 2048}}
    got = admit(json.dumps(over).encode(), "vigil.submit.acme", None, 2, NOW, conf)
    assert isinstance(got, Reject) and got.task_id == "t2"
    assert got.field == "$.resources.memory_mb" and "maximum of 1024 MiB" in got.error
    # Another tenant has no maximum here.
    got = admit(json.dumps(over).encode(), "vigil.submit.beta", None, 3, NOW, conf)
    assert isinstance(got, Admit)
    # The spec's own shape is checked by decoding: an unknown field, a value out of range.
    bad = {"command": ["true"], "resources": {"memory_mb": 8}}
    got = admit(json.dumps(bad).encode(), "vigil.submit.acme", None, 4, NOW, conf)
    assert isinstance(got, Reject) and got.field == "$.resources.memory_mb"
    bad = {"command": ["true"], "resources": {"gpus": 1}}
    got = admit(json.dumps(bad).encode(), "vigil.submit.acme", None, 5, NOW, conf)
    assert isinstance(got, Reject) and got.field is not None
    assert got.field.startswith("$.resources")


def test_resources_round_trip_the_wire() -> None:
    r = Resources(memory_mb=1024, cpus=1.5)
    assert msgspec.json.decode(msgspec.json.encode(r), type=Resources) == r
