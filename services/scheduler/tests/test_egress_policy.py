"""Unit tests: a task's egress at admission, the tenant's default and maximum."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from vigil.egress import parse_rule
from vigil.errors import InvalidTask
from vigil.messages import Egress, TaskSpec
from vigil_scheduler.admission import Admit, Reject, admit
from vigil_scheduler.egress_policy import check_settings, effective, within
from vigil_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("rule", "maximum", "ok"), [
    ("api.example.com", ["*"], True),
    ("git.internal:22", ["*"], True),
    ("10.1.2.3:5432", ["*"], True),
    ("api.example.com", ["*:443"], False),  # 80 is not covered
    ("api.example.com:443", ["*:443"], True),
    ("api.example.com", ["*:443", "*:80"], True),  # each port by another rule
    ("api.example.com", ["api.example.com"], True),
    ("API.example.com:80", ["api.example.com"], True),
    ("api.example.com:8080", ["api.example.com"], False),
    ("api.example.com", ["api.example.com:443"], False),
    ("api.example.com", ["*.example.com"], True),
    ("a.b.example.com:443", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),  # the domain itself is not under it
    ("*.example.com", ["*.example.com"], True),
    ("*.sub.example.com:443", ["*.example.com"], True),
    ("*.example.com", ["api.example.com"], False),
    ("*.example.com", ["*.sub.example.com"], False),
    ("*.example.com:443", ["*.example.com:80"], False),
    ("evilexample.com", ["*.example.com"], False),
    ("10.1.2.3", ["10.1.2.3"], True),
    ("10.1.2.3", ["*.2.3.example"], False),
    ("10.1.2.3", ["api.example.com"], False),
    ("api.example.com", ["10.1.2.3"], False),
    ("api.example.com", [], False),  # an empty maximum allows nothing
])
def test_within(rule: str, maximum: list[str], ok: bool) -> None:
    outer = [parse_rule(m, maximum=True) for m in maximum]
    assert within(parse_rule(rule), outer) is ok


def spec(**fields: object) -> TaskSpec:
    return TaskSpec(command=["true"], **fields)  # type: ignore[arg-type]


def test_the_default_applies_only_when_egress_is_left_out() -> None:
    default = ("pypi.org", "*.pythonhosted.org:443")
    assert effective(spec(), "acme", default, ("*",)) == Egress(allow=list(default))
    assert effective(spec(), "acme", (), ("*",)) is None
    explicit_none = Egress(allow=[])
    assert effective(spec(egress=explicit_none), "acme", default, ("*",)) is explicit_none
    own = Egress(allow=["api.example.com"])
    assert effective(spec(egress=own), "acme", default, ("*",)) is own


def test_a_rule_beyond_the_maximum_names_its_field_and_the_maximum() -> None:
    egress = Egress(allow=["api.example.com", "db.internal:5432"])
    with pytest.raises(InvalidTask) as caught:
        effective(spec(egress=egress), "acme", (), ("*.example.com", "*:443"))
    assert caught.value.field == "$.egress.allow[1]"
    assert str(caught.value) == (
        "invalid task spec: egress rule 'db.internal:5432' is not within tenant 'acme''s "
        "egress maximum ['*.example.com', '*:443']; ask an operator to widen it "
        "(egress_max in VIGIL_TENANT_LIMITS) (at $.egress.allow[1])")
    # What the contract's schema admits, admission does not refuse for its shape: the
    # proxy refuses a numeric name (it allows nothing); only the maximum decides here.
    numeric = Egress(allow=["127.1"])
    assert effective(spec(egress=numeric), "acme", (), ("*",)) is numeric


def test_the_proxy_variables_are_the_platform_s_when_there_is_egress() -> None:
    with pytest.raises(InvalidTask) as caught:
        effective(spec(env={"https_proxy": "http://mine:8080"}), "acme", ("x.org",), ("*",))
    assert caught.value.field == "$.env.https_proxy"
    assert "https_proxy is set by the platform when the task has egress" in str(caught.value)
    # Without egress they reach nothing anyway: the task may set them as it likes.
    assert effective(spec(env={"HTTPS_PROXY": "x"}), "acme", (), ("*",)) is None
    assert effective(spec(env={"HTTPS_PROXY": "x"}, egress=Egress(allow=[])), "acme", (),
                     ("*",)) == Egress(allow=[])


def test_settings_are_checked_at_start() -> None:
    names = {"default_name": "D", "max_name": "M"}
    check_settings(["pypi.org"], ["*.pypi.org", "pypi.org"], **names)
    with pytest.raises(ValueError, match=re.escape("D: 'evil.org' is not within M "
                                                   "['pypi.org']")):
        check_settings(["evil.org"], ["pypi.org"], **names)
    with pytest.raises(ValueError, match=re.escape("M: '**' is not an egress rule")):
        check_settings([], ["**"], **names)
    limits = json.dumps({"acme": {"egress_default": ["pypi.org"], "egress_max": ["x.org"]}})
    with pytest.raises(ValueError, match=re.escape(
            "VIGIL_TENANT_LIMITS: tenant 'acme' egress_default (or VIGIL_EGRESS_DEFAULT): "
            "'pypi.org' is not within its egress_max (or VIGIL_EGRESS_MAX) ['x.org']")):
        SchedulerSettings(tenant_limits=limits)
    with pytest.raises(ValueError, match=re.escape("VIGIL_EGRESS_MAX: '*.*' is not")):
        SchedulerSettings(egress_max="*.*")
    with pytest.raises(ValueError, match=re.escape("VIGIL_EGRESS_DEFAULT: 'x.org' is not "
                                                   "within VIGIL_EGRESS_MAX ['*.y.org']")):
        SchedulerSettings(egress_default="x.org", egress_max="*.y.org")


def run(body: dict[str, object], conf: SchedulerSettings, subject: str = "vigil.submit.acme"
        ) -> Admit | Reject:
    return admit(json.dumps(body).encode(), subject, None, 7, NOW, conf)


def test_admission_applies_the_tenant_s_egress() -> None:
    conf = SchedulerSettings(
        egress_default="pypi.org", egress_max="*",
        tenant_limits=json.dumps({"acme": {"egress_default": ["files.example.com"],
                                           "egress_max": ["*.example.com"]}}))
    got = run({"command": ["true"]}, conf)
    assert isinstance(got, Admit)
    assert got.work.spec.egress == Egress(allow=["files.example.com"])
    assert got.state.spec is not None and got.state.spec.egress == got.work.spec.egress
    other = run({"command": ["true"]}, conf, "vigil.submit.beta")  # the fleet's default
    assert isinstance(other, Admit) and other.work.spec.egress == Egress(allow=["pypi.org"])
    refused = run({"id": "wide", "command": ["true"], "egress": {"allow": ["pypi.org"]}}, conf)
    assert isinstance(refused, Reject)
    assert (refused.task_id, refused.field) == ("wide", "$.egress.allow[0]")
    assert refused.error.endswith("(at $.egress.allow[0])")
    ok = run({"command": ["true"], "egress": {"allow": ["a.example.com:443"]}}, conf)
    assert isinstance(ok, Admit) and ok.work.spec.egress == Egress(allow=["a.example.com:443"])


def test_a_refusal_is_recorded_under_the_task_s_own_id() -> None:
    """The gateway waits for the verdict on the id it made: a refusal by the tenant's
    limits must be recorded there (not under the stream sequence), or its caller would
    get a 202 for a task that never runs."""
    conf = SchedulerSettings(egress_max="x.org")
    gateway_id = "t_" + "a" * 26
    got = run({"id": gateway_id, "command": ["true"], "egress": {"allow": ["y.org"]}}, conf,
              "vigil.submit.acme.gateway")
    assert isinstance(got, Reject) and got.task_id == gateway_id
    by_seq = run({"command": ["true"], "egress": {"allow": ["y.org"]}}, conf)
    assert isinstance(by_seq, Reject) and by_seq.task_id == "s7"
