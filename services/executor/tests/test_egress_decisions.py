"""Unit tests: the egress proxy's decisions (vigil_executor.egress_rules), no sockets."""

from __future__ import annotations

import ipaddress
import re

import pytest

from vigil.egress import parse_rules
from vigil_executor.egress import EgressMount, proxy_env
from vigil_executor.egress_rules import (
    BadRequest,
    Request,
    address_kind,
    answer,
    judge,
    parse_cidrs,
    parse_head,
    vet,
)

pytestmark = pytest.mark.unit

RULES = parse_rules(["api.example.com", "*.pypi.org:443", "git.internal:22", "203.0.113.7"])


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_connect_is_a_tunnel() -> None:
    req = parse_head(b"CONNECT Files.PyPI.org.:443 HTTP/1.1\r\nHost: files.pypi.org:443")
    assert req == Request(host="files.pypi.org", port=443, tunnel=True)
    assert parse_head(b"CONNECT [2001:db8::1]:443 HTTP/1.1").host == "2001:db8::1"


def test_plain_http_is_rewritten_to_origin_form_with_connection_close() -> None:
    head = (b"POST http://api.example.com/v1/x?q=1 HTTP/1.1\r\nHost: other.example.com\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
            b"Content-Length: 3\r\nConnection: keep-alive\r\nX-Token: t")
    req = parse_head(head)
    assert (req.host, req.port, req.tunnel) == ("api.example.com", 80, False)
    # Host is the vetted host (not another virtual host of the same server); hop-by-hop
    # and proxy headers go no further; one request per connection.
    assert req.upstream == (b"POST /v1/x?q=1 HTTP/1.1\r\nHost: api.example.com\r\n"
                            b"Content-Length: 3\r\nX-Token: t\r\nConnection: close\r\n\r\n")
    assert parse_head(b"GET http://h.example.com:8080 HTTP/1.0").upstream.startswith(
        b"GET / HTTP/1.0\r\nHost: h.example.com:8080\r\n")


@pytest.mark.parametrize(("head", "status", "why"), [
    (b"GET / HTTP/1.1", 400, "absolute http:// URL"),
    (b"GET https://api.example.com/ HTTP/1.1", 400, "use CONNECT"),
    (b"CONNECT api.example.com HTTP/1.1", 400, "CONNECT needs host:port"),
    (b"CONNECT api.example.com:0 HTTP/1.1", 400, "not 1-65535"),
    (b"CONNECT api.example.com:99999 HTTP/1.1", 400, "not 1-65535"),
    (b"CONNECT a b:1 HTTP/1.1", 400, "request line"),
    (b"CONNECT bad/host:443 HTTP/1.1", 400, "not a host name"),
    (b"CONNECT [nope]:443 HTTP/1.1", 400, "IPv6"),
    (b"connect api.example.com:443 HTTP/1.1", 400, "request line"),
    (b"CONNECT api.example.com:443 HTTP/2", 400, "request line"),
    (b"GET http://u:p@api.example.com/ HTTP/1.1", 400, "credentials"),
    (b"GET http://api.example.com/ HTTP/1.1\r\n folded", 400, "malformed header"),
    (b"GET http://api.example.com/ HTTP/1.1" + b"\r\nA: b" * 101, 431, "header lines"),
])
def test_malformed_requests(head: bytes, status: int, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as caught:
        parse_head(head)
    assert caught.value.status == status


@pytest.mark.parametrize(("host", "port", "kind"), [
    ("api.example.com", 443, None),
    ("x.pypi.org", 443, None),
    ("git.internal", 22, None),
    ("203.0.113.7", 80, None),
    ("evil.example.net", 443, "not_listed"),
    ("pypi.org", 443, "not_listed"),
    ("api.example.com", 22, "not_listed"),
    ("198.51.100.1", 443, "address_not_listed"),
    ("2001:db8::1", 443, "ipv6_literal"),
    ("127.1", 443, "invalid_host"),
    ("_dmarc.example.com", 443, "invalid_host"),  # cannot be listed: no "add it" hint
])
def test_judge(host: str, port: int, kind: str | None) -> None:
    refusal = judge(RULES, Request(host=host, port=port, tunnel=True))
    assert (refusal.kind if refusal else None) == kind


def test_a_refusal_names_the_rule_that_would_allow_it() -> None:
    refusal = judge(RULES, Request(host="evil.example.net", port=8443, tunnel=True))
    assert refusal is not None
    assert refusal.reason == "evil.example.net:8443: not on the task's egress list"
    assert 'egress.allow += ["evil.example.net:8443"]' in refusal.hint
    by_address = judge(RULES, Request(host="198.51.100.1", port=443, tunnel=True))
    assert by_address is not None and '["198.51.100.1:443"]' in by_address.hint


@pytest.mark.parametrize(("address", "kind"), [
    ("93.184.216.34", None), ("2606:2800:220:1:248:1893:25c8:1946", None),
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("::", "unspecified"),
    ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to judge, not to bind
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd00::1", "private"), ("192.0.2.2", "private"),  # documentation ranges too
    ("240.0.0.1", "private"), ("100.64.0.1", "not globally routable"),
])
def test_address_kind(address: str, kind: str | None) -> None:
    assert address_kind(ip(address)) == kind


def test_any_non_public_address_refuses_unless_the_operator_allows_its_range() -> None:
    req = Request(host="git.internal", port=22, tunnel=True)
    public = [ip("93.184.216.34")]
    assert vet(req, public, ()) is None
    # One private address among public ones is enough: the proxy picks which it uses.
    refusal = vet(req, [*public, ip("10.1.2.3")], ())
    assert refusal is not None and refusal.kind == "private_address"
    assert refusal.reason == "git.internal:22: git.internal resolves to a private address"
    assert "10.1.2.3" not in refusal.reason  # not told to the agent
    assert "VIGIL_EGRESS_ALLOW_CIDRS" in refusal.hint and "10.1.2.3/32" in refusal.hint
    nets = parse_cidrs("10.0.0.0/8, fd00::/8")
    assert vet(req, [*public, ip("10.1.2.3"), ip("fd00::5")], nets) is None
    assert vet(req, [ip("10.1.2.3"), ip("127.0.0.1")], nets) is not None
    literal = vet(Request(host="127.0.0.1", port=80, tunnel=False), [ip("127.0.0.1")], ())
    assert literal is not None and literal.reason == "127.0.0.1:80: 127.0.0.1 is a loopback address"


def test_cidrs_setting() -> None:
    assert parse_cidrs("") == ()
    assert parse_cidrs("127.0.0.0/8,::1/128") == (ipaddress.ip_network("127.0.0.0/8"),
                                                   ipaddress.ip_network("::1/128"))
    with pytest.raises(ValueError, match=re.escape("VIGIL_EGRESS_ALLOW_CIDRS: '10.1.2.3/8' "
                                                   "is not a network")):
        parse_cidrs("10.1.2.3/8")


def test_answers_and_the_container_side() -> None:
    assert answer(403, "x:1: not on the task's egress list") == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 49\r\nX-Vigil-Egress: proxy\r\nConnection: close\r\n\r\n"
        b"vigil egress: x:1: not on the task's egress list\n")
    mount = EgressMount(relay="/state/relay/vigil-relay")
    assert mount.command(["python3", "-c", "x"]) == [
        "/run/vigil-relay", "/run/vigil/egress.sock", "--", "python3", "-c", "x"]
    env = proxy_env(mount.socket)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert env["VIGIL_EGRESS_SOCKET"] == "/run/vigil/egress.sock"
