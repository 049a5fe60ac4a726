"""What an egress rule means: the one reading of ``TaskSpec.egress.allow`` (see
:class:`vigil.messages.Egress`), shared by the scheduler (a tenant's maximum) and the
executor (its proxy), so that the two can never disagree on what a rule allows.

A rule is ``host``, ``*.domain`` (any name under the domain, not the domain itself) or
either with ``:port``; without a port it allows 80 and 443. Names compare
case-insensitively, without a trailing dot. A canonical IPv4 address is a host too, and
matches only itself (never a ``*.`` rule). A name whose last label is numeric is neither
a DNS name nor an IPv4 address (``127.1``, ``010.0.0.1``: resolvers read those as
addresses, each its own way): the proxy refuses to connect to one, so a rule naming one
allows nothing (it is not refused at admission: the contract's schema admits it).

A tenant's maximum (a scheduler setting) may also hold ``*`` (anything: any host, any
port) and ``*:port`` (any host on that port).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from vigil.messages import EGRESS_RULE_PATTERN

DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})
PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY", "no_proxy")
"""What the platform sets in the container of a task with egress (the executor's proxy);
admission refuses a task with egress that sets one of them itself."""
ANY = "*"
_RULE = re.compile(EGRESS_RULE_PATTERN)
_ANY_ON_PORT = re.compile(r"^\*:([0-9]{1,5})$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")


@dataclass(frozen=True)
class Rule:
    """One parsed rule. ``host`` is lower case: the name, the domain after ``*.``, the
    IPv4 address, or "" for ``*``; ``ports`` is None for any port (``*`` only)."""

    text: str
    host: str
    wildcard: bool = False
    ports: frozenset[int] | None = DEFAULT_PORTS
    address: bool = False  # host is an IPv4 address

    @property
    def any_host(self) -> bool:
        return self.host == ""

    def matches(self, host: str, port: int) -> bool:
        """Whether this rule allows ``host`` (as :func:`normal_host` gives it) on ``port``."""
        if self.ports is not None and port not in self.ports:
            return False
        if self.any_host:
            return True
        if self.wildcard:
            return host.endswith("." + self.host) and not is_ipv4(host)
        return host == self.host

    def first_port(self) -> int:
        """A port this rule allows, for examples in messages (443 when it has both)."""
        if self.ports is None:
            return 443
        return 443 if 443 in self.ports else min(self.ports)


def normal_host(host: str) -> str:
    """``host`` as rules compare it: lower case, without one trailing dot."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def is_ipv4(host: str) -> bool:
    """Whether ``host`` is a canonical dotted-quad IPv4 address."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def numeric_name(host: str) -> bool:
    """A name whose last label is numeric (or hex) but that is no canonical IPv4 address:
    ``127.1``, ``0x7f.1``, ``010.0.0.1``. Resolvers turn these into addresses by rules of
    their own, so neither a rule nor a request may use one."""
    last = host.rsplit(".", 1)[-1]
    return bool(_NUMERIC_LABEL.fullmatch(last)) and not is_ipv4(host)


def parse_rule(text: str, *, maximum: bool = False) -> Rule:
    """Parse ``text`` (a task's rule; with ``maximum``, a tenant maximum's, which may also
    be ``*`` or ``*:port``), or raise ValueError saying what is wrong with it."""
    if maximum and text == ANY:
        return Rule(text=text, host="", ports=None)
    if maximum and (any_port := _ANY_ON_PORT.fullmatch(text)):
        return Rule(text=text, host="", ports=frozenset({_port(any_port.group(1), text)}))
    if len(text) > 259 or not _RULE.fullmatch(text):
        shapes = "host, *.domain, either with :port, or * or *:port" if maximum else \
            "host, *.domain, or either with :port"
        raise ValueError(f"{text!r} is not an egress rule ({shapes})")
    name, sep, port = text.partition(":")
    ports = frozenset({_port(port, text)}) if sep else DEFAULT_PORTS
    wildcard = name.startswith("*.")
    host = normal_host(name[2:] if wildcard else name)
    return Rule(text=text, host=host, wildcard=wildcard, ports=ports,
                address=not wildcard and is_ipv4(host))


def parse_rules(texts: Iterable[str], *, maximum: bool = False) -> list[Rule]:
    return [parse_rule(t, maximum=maximum) for t in texts]


def first_match(rules: Iterable[Rule], host: str, port: int) -> Rule | None:
    """The first of ``rules`` that allows ``host`` (normalised) on ``port``, if any."""
    return next((r for r in rules if r.matches(host, port)), None)


def _port(text: str, rule: str) -> int:
    port = int(text)
    if not 1 <= port <= 65_535:
        raise ValueError(f"{rule!r}: port {port} is not 1-65535")
    return port
