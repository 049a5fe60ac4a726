"""The egress proxy's decisions, as pure functions: what a request asks for, whether the
task's rules allow it, and whether the addresses a name resolves to may be reached.

The proxy (:mod:`vigil_executor.egress`) does the I/O; everything it decides is here and
unit-tested without a socket. A refusal carries the text the agent gets (in the 403 and
its ``egress`` event) and the hint its one confession gives, naming what would allow it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from vigil.egress import Rule, first_match, is_ipv4, normal_host, numeric_name, parse_rule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HEAD = 16 * 1024  # a request head (request line and headers) longer than this: 431
MAX_HEADERS = 100
CIDRS_SETTING = "VIGIL_EGRESS_ALLOW_CIDRS"
_METHOD = re.compile(rb"^[A-Z]{1,20}$")
_HOST = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]{0,252})$")
_HEADER_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never sent upstream. The proxy
# sends ``Connection: close`` instead and sets ``Host`` to the host it vetted, so a request
# cannot ask the allowed server for another of its virtual hosts.
_DROPPED = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization",
                      b"proxy-authenticate", b"te", b"trailer", b"upgrade", b"host"})


class BadRequest(Exception):
    """The agent's request is not one the proxy understands: answered with ``status``."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Request:
    """What the agent asked for: a tunnel (``CONNECT host:port``) or one plain HTTP
    request, whose head (``upstream``) is rewritten to origin form for the server."""

    host: str  # normalised (lower case, no trailing dot; an IPv6 address without brackets)
    port: int
    tunnel: bool
    upstream: bytes = b""

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


RefusalKind = Literal["not_listed", "address_not_listed", "ipv6_literal", "invalid_host",
                      "private_address"]


@dataclass(frozen=True)
class Refusal:
    """Why the proxy refused a connection: ``reason`` for the agent (its 403 and event),
    ``hint`` for the confession (what would allow it, and who can change that)."""

    kind: RefusalKind
    reason: str
    hint: str


def parse_head(head: bytes) -> Request:
    """Read a request head (up to and without its blank line), or raise BadRequest."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or \
            parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("not an HTTP/1.x proxy request line")
    method, target, version = parts
    headers = lines[1:]
    if len(headers) > MAX_HEADERS:
        raise BadRequest(f"more than {MAX_HEADERS} header lines", 431)
    if method == b"CONNECT":
        host, port = _authority(target.decode("ascii", "replace"))
        return Request(host=host, port=port, tunnel=True)
    url = target.decode("ascii", "replace")
    if not url.lower().startswith("http://"):
        raise BadRequest("give an absolute http:// URL (plain HTTP), or use CONNECT for "
                         "TLS (HTTPS_PROXY does that)")
    parts_ = urlsplit(url)
    if parts_.username is not None or parts_.password is not None:
        raise BadRequest("credentials in the URL are not passed on; send them in a header")
    host, port = _authority(parts_.netloc, default_port=80)
    path = (parts_.path or "/") + (f"?{parts_.query}" if parts_.query else "")
    out = [method + b" " + path.encode("ascii") + b" " + version,
           b"Host: " + (host if port == 80 else f"{host}:{port}").encode("ascii")]
    for line in headers:
        name, sep, _ = line.partition(b":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise BadRequest("a malformed header line (obsolete line folding is not "
                             "accepted)")
        if name.lower() not in _DROPPED:
            out.append(line)
    out.append(b"Connection: close")
    return Request(host=host, port=port, tunnel=False, upstream=b"\r\n".join(out) + b"\r\n\r\n")


def _authority(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (normalised host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadRequest(f"{text!r} is not [IPv6 address]:port") from None
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise BadRequest(f"{text!r} is not [IPv6 address]:port")
    else:
        host, sep, port_text_ = text.rpartition(":")
        if not sep:
            host, port_text_ = text, ""
        port_text = port_text_ or None
        host = normal_host(host)
        if not _HOST.fullmatch(host) or ".." in host:
            raise BadRequest("the host is not a host name or an IPv4 address")
    if port_text is None:
        if default_port is None:
            raise BadRequest("CONNECT needs host:port")
        return host.lower(), default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
        raise BadRequest(f"port {port_text!r} is not 1-65535")
    return host.lower(), int(port_text)


def judge(rules: Sequence[Rule], request: Request) -> Refusal | None:
    """Whether the task's rules allow the request's host and port (None) or not."""
    host, port = request.host, request.port
    if ":" in host:
        return Refusal("ipv6_literal", f"{request.target}: an IPv6 address cannot be listed",
                       "egress rules name hosts or IPv4 addresses; ask for the host by name")
    if numeric_name(host):
        return Refusal("invalid_host", f"{request.target}: neither a host name nor an IPv4 "
                       "address", "write an address as a.b.c.d, or use the host's name")
    if first_match(rules, host, port) is not None:
        return None
    rule = f"{host}:{port}"
    try:
        parse_rule(rule)
    except ValueError:
        return Refusal("invalid_host", f"{request.target}: not on the task's egress list",
                       "this name cannot be listed (egress rules take letters, digits, "
                       "hyphens and dots); ask for the host by another name")
    if is_ipv4(host):
        return Refusal(
            "address_not_listed", f"{request.target}: an address is reached only if it is "
            "listed itself, and it is not on the task's egress list",
            f'list the address itself (egress.allow += ["{rule}"]) or ask for the host by '
            "name; the tenant's egress maximum must cover it")
    return Refusal(
        "not_listed", f"{request.target}: not on the task's egress list",
        f'add it to the task: egress.allow += ["{rule}"] (the tenant\'s egress maximum '
        "must cover it)")


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_kind(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one (loopback, private ...), or None if it is."""
    address = unmapped(address)
    checks = (("loopback", address.is_loopback), ("unspecified", address.is_unspecified),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("private", address.is_private), ("reserved", address.is_reserved),
              ("not globally routable", not address.is_global))
    return next((kind for kind, hit in checks if hit), None)


def vet(request: Request, addresses: Iterable[IPAddress],
        allowed: Sequence[IPNetwork]) -> Refusal | None:
    """Refuse the request if ANY of the addresses its host resolved to is not public and
    not in a range the operator allowed: a name with one private address among public
    ones must not be a way in (the proxy picks the address to connect to)."""
    for address in map(unmapped, addresses):
        kind = address_kind(address)
        if kind is None or any(address in net for net in allowed):
            continue
        # The address itself is not told to the agent: a name it may reach must not
        # become a way to map the network behind the executor. The operator's log has it.
        what = "is" if is_ipv4(request.host) else "resolves to"
        return Refusal(
            "private_address", f"{request.target}: {request.host} {what} a {kind} address",
            f"the executor refuses loopback, private, link-local and other non-public "
            f"addresses; an operator may allow a range on the executor with "
            f"{CIDRS_SETTING} (e.g. {ipaddress.ip_network(address)})")
    return None


def parse_cidrs(text: str) -> tuple[IPNetwork, ...]:
    """``VIGIL_EGRESS_ALLOW_CIDRS``: comma-separated networks, or raise ValueError."""
    nets: list[IPNetwork] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"{CIDRS_SETTING}: {item!r} is not a network ({exc})") from None
    return tuple(nets)


def answer(status: int, reason: str) -> bytes:
    """The proxy's own short answer to the agent (a refusal, a failure). ``X-Vigil-Egress``
    tells it from the origin's: a 403 of the proxy is not the API refusing a key."""
    titles = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
              502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    body = f"vigil egress: {reason}\n".encode()
    return (f"HTTP/1.1 {status} {titles.get(status, 'Error')}\r\nContent-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\nX-Vigil-Egress: proxy\r\n"
            "Connection: close\r\n\r\n"
            ).encode() + body
