"""Unit tests: what an egress rule allows (vigil.egress), the one reading of the contract."""

from __future__ import annotations

import msgspec
import pytest

from vigil.egress import (
    DEFAULT_PORTS,
    first_match,
    normal_host,
    numeric_name,
    parse_rule,
    parse_rules,
)
from vigil.messages import Egress

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("rule", "host", "port", "allowed"), [
    ("api.example.com", "api.example.com", 443, True),
    ("api.example.com", "api.example.com", 80, True),
    ("api.example.com", "api.example.com", 8443, False),  # no port: 80 and 443 only
    ("api.example.com", "API.Example.COM", 443, True),  # names compare case-insensitively
    ("API.example.com", "api.example.com", 443, True),
    ("api.example.com", "api.example.com.", 443, True),  # a trailing dot is the same name
    ("api.example.com", "example.com", 443, False),
    ("api.example.com", "x.api.example.com", 443, False),
    ("api.example.com", "api.example.com.evil.net", 443, False),
    ("*.pypi.org:443", "files.pypi.org", 443, True),
    ("*.pypi.org:443", "a.b.pypi.org", 443, True),  # any name under the domain
    ("*.pypi.org:443", "pypi.org", 443, False),  # ... not the domain itself
    ("*.pypi.org:443", "files.pypi.org", 80, False),
    ("*.pypi.org:443", "evilpypi.org", 443, False),
    ("*.pypi.org", "files.pypi.org", 80, True),
    ("git.internal:22", "git.internal", 22, True),
    ("git.internal:22", "git.internal", 443, False),
    ("203.0.113.7", "203.0.113.7", 443, True),  # an IPv4 literal matches itself
    ("203.0.113.7:8080", "203.0.113.7", 8080, True),
    ("203.0.113.7", "203.0.113.8", 443, False),
    ("*.113.7", "203.0.113.7", 443, False),  # an address never matches a *. rule
])
def test_rule_matches(rule: str, host: str, port: int, allowed: bool) -> None:
    assert parse_rule(rule).matches(normal_host(host), port) is allowed


@pytest.mark.parametrize("rule", [
    "*", "*:443", "*.*.example.com", "exa mple.com", "-bad.com", "host:0", "host:65536",
    "host:0443", "", "a" * 300,
])
def test_task_rules_refused(rule: str) -> None:
    with pytest.raises(ValueError, match=r"egress rule|not 1-65535"):
        parse_rule(rule)
    with pytest.raises(msgspec.ValidationError):  # the contract's schema says the same
        msgspec.convert({"allow": [rule]}, Egress)


@pytest.mark.parametrize("rule", ["127.1", "010.0.0.1", "a.123", "*.1.2.3"])
def test_numeric_names_parse_but_name_nothing(rule: str) -> None:
    """The schema admits them (so admission does too); the proxy refuses a request for
    such a name (vigil_executor.egress_rules.judge), so they allow nothing."""
    assert numeric_name(parse_rule(rule).host)


def test_a_maximum_may_be_anything_or_a_port() -> None:
    anything = parse_rule("*", maximum=True)
    assert anything.any_host and anything.ports is None
    assert anything.matches("10.1.2.3", 22) and anything.matches("x.org", 65535)
    on_port = parse_rule("*:443", maximum=True)
    assert on_port.matches("x.org", 443) and not on_port.matches("x.org", 80)
    assert parse_rule("git.internal:22", maximum=True).ports == frozenset({22})
    with pytest.raises(ValueError, match=r"\* or \*:port"):
        parse_rule("**", maximum=True)


def test_first_match_and_defaults() -> None:
    rules = parse_rules(["a.example.com:8080", "*.example.com"])
    assert first_match(rules, "a.example.com", 8080) is rules[0]
    assert first_match(rules, "a.example.com", 443) is rules[1]
    assert first_match(rules, "a.example.com", 22) is None
    assert rules[1].ports == DEFAULT_PORTS and rules[1].first_port() == 443


def test_every_rule_the_contract_takes_parses() -> None:
    """The contract's pattern and the parser agree: anything TaskSpec admits either
    parses or is refused for a reason parse_rule names (numeric names)."""
    spec = msgspec.json.decode(
        b'{"allow": ["api.example.com", "*.pypi.org:443", "git.internal:22", "1.2.3.4"]}',
        type=Egress)
    assert [r.text for r in parse_rules(spec.allow)] == spec.allow
