"""The executor's egress proxy and the in-container relay, with real sockets and real
servers on this host (no container: tests/test_egress.py runs them in Podman)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from egress_support import BODY, CertAuthority, make_ca, web_server

from support import eventually
from vigil.egress import parse_rules
from vigil.messages import Egress, EgressEvent, Event, TaskSpec, WorkItem
from vigil_executor import egress as egress_mod
from vigil_executor import egress_connection
from vigil_executor.egress import EgressMount, EgressNode, EgressProxy
from vigil_executor.metrics import Metrics
from vigil_executor.settings import ExecutorSettings

pytestmark = pytest.mark.integration

RELAY = Path(ExecutorSettings().egress_relay)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


class Recorder:
    """Where the proxy's events and confessions go (the attempt's sink and _confess)."""

    def __init__(self) -> None:
        self.events: list[EgressEvent] = []
        self.confessions: list[dict[str, Any]] = []

    def emit(self, event: Event) -> None:
        assert isinstance(event, EgressEvent)
        self.events.append(event)

    async def confess(self, severity: str, category: str, summary: str, **kw: Any) -> None:
        self.confessions.append({"severity": severity, "category": category,
                                 "summary": summary, **kw})


@pytest.fixture
async def proxy_for(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[EgressProxy] = []

    async def make(rules: list[str], **settings: Any) -> tuple[EgressProxy, Recorder, Path]:
        conf = ExecutorSettings(node_id="egress-test", **settings)
        node = EgressNode(conf, Metrics())
        work = WorkItem(task_id="t1", tenant="acme", submitted_at=datetime.now(UTC),
                        spec=TaskSpec(command=["true"], egress=Egress(allow=rules)))
        rec = Recorder()
        directory = tmp_path / f"control-{len(made)}"
        directory.mkdir()
        proxy = EgressProxy(work, 1, parse_rules(rules), node, emit=rec.emit,
                            confess=rec.confess, mount=EgressMount(relay=str(RELAY)))
        await proxy.start(directory)
        made.append(proxy)
        return proxy, rec, directory / "egress.sock"

    yield make
    for proxy in made:
        await proxy.close()


async def ask(sock: Path, head: bytes) -> tuple[int, bytes, asyncio.StreamReader,
                                                 asyncio.StreamWriter]:
    """Send a request head to the proxy; (status, the rest of its answer head, streams)."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(head)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    return int(answer.split(b" ", 2)[1]), answer, reader, writer


async def https_get(sock: Path, ca: CertAuthority, host: str, port: int, path: str = "/") -> bytes:
    status, answer, reader, writer = await ask(
        sock, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    assert status == 200, answer
    tls = ssl.create_default_context(cafile=ca.ca_pem)
    await writer.start_tls(tls, server_hostname=host)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    return data


async def test_an_allowed_tunnel_relays_tls_and_is_recorded(
    proxy_for: Any, ca: CertAuthority
) -> None:
    async with web_server(ca) as web:
        proxy, rec, sock = await proxy_for([f"localhost:{web.port}"],
                                           egress_allow_cidrs="127.0.0.0/8")
        data = await https_get(sock, ca, "localhost", web.port)
        assert data.endswith(BODY)
        (event,) = await eventually(lambda: _aw(rec.events), what="the egress event")
        assert (event.host, event.port, event.allowed, event.address) == (
            "localhost", web.port, True, "127.0.0.1")
        assert event.reason is None and event.task_id == "t1" and event.attempt == 1
        # TLS bytes, both ways, as relayed (the tunnel is not opened: no interception).
        assert event.bytes_out > 100 and event.bytes_in > len(data)
        assert rec.confessions == []
        metrics = proxy._metrics
        assert metrics.egress_connections.labels("allowed")._value.get() == 1
        assert metrics.egress_bytes.labels("in")._value.get() == event.bytes_in
        assert metrics.egress_bytes.labels("out")._value.get() == event.bytes_out


async def _aw(value: Any) -> Any:
    return value


async def test_plain_http_is_forwarded_with_the_vetted_host(proxy_for: Any) -> None:
    async with web_server() as web:
        _, rec, sock = await proxy_for([f"localhost:{web.port}"], egress_allow_cidrs="127.0.0.0/8")
        status, _, reader, writer = await ask(
            sock, f"GET http://LOCALHOST:{web.port}/x?y=1 HTTP/1.1\r\nHost: evil.example\r\n"
            f"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nConnection: keep-alive\r\n\r\n"
            .encode())
        assert status == 200
        assert await reader.read() == BODY
        writer.close()
        assert web.heads == [f"GET /x?y=1 HTTP/1.1\r\nHost: localhost:{web.port}\r\n"
                             "Connection: close\r\n\r\n".encode()]
        (event,) = await eventually(lambda: _aw(rec.events), what="the egress event")
        assert event.allowed and event.bytes_in > len(BODY)


async def test_refusals_answer_403_and_are_confessed_once_per_host(proxy_for: Any) -> None:
    _, rec, sock = await proxy_for(["api.example.com"])
    for _ in range(2):
        status, answer, _, writer = await ask(
            sock, b"CONNECT evil.example.net:443 HTTP/1.1\r\n\r\n")
        writer.close()
        assert status == 403
        assert answer.endswith(b"\r\n\r\n")
    status, _, reader, writer = await ask(sock, b"CONNECT 93.184.216.34:443 HTTP/1.1\r\n\r\n")
    body = await reader.read()
    writer.close()
    assert status == 403
    assert body == (b"vigil egress: 93.184.216.34:443: an address is reached only if it is "
                    b"listed itself, and it is not on the task's egress list\n")
    events = await eventually(lambda: _aw(len(rec.events) == 3 and rec.events),
                              what="three events")
    assert [(e.host, e.allowed) for e in events] == [
        ("evil.example.net", False), ("evil.example.net", False), ("93.184.216.34", False)]
    assert events[0].reason == "evil.example.net:443: not on the task's egress list"
    confessions = await eventually(lambda: _aw(len(rec.confessions) == 2 and rec.confessions),
                                   what="two confessions")
    assert [c["category"] for c in confessions] == ["egress_refused"] * 2
    first = confessions[0]
    assert first["summary"] == ("task t1 was refused egress to evil.example.net:443: "
                                "evil.example.net:443: not on the task's egress list")
    assert 'egress.allow += ["evil.example.net:443"]' in first["hint"]
    assert first["confession_id"] == "executor-acme.t1-egress-evil.example.net-443"


async def test_an_allowed_name_on_loopback_is_refused_unless_the_operator_allows_it(
    proxy_for: Any, ca: CertAuthority
) -> None:
    async with web_server(ca) as web:
        _, rec, sock = await proxy_for([f"localhost:{web.port}", f"127.0.0.1:{web.port}"])
        for host in ("localhost", "127.0.0.1"):
            status, _, reader, writer = await ask(
                sock, f"CONNECT {host}:{web.port} HTTP/1.1\r\n\r\n".encode())
            body = await reader.read()
            writer.close()
            assert status == 403
            verb = "resolves to" if host == "localhost" else "is"
            assert body.decode() == (f"vigil egress: {host}:{web.port}: {host} {verb} a "
                                     "loopback address\n")
        assert web.heads == []  # never connected
        confessions = await eventually(lambda: _aw(len(rec.confessions) == 2 and rec.confessions),
                                       what="two confessions")
        assert all("VIGIL_EGRESS_ALLOW_CIDRS" in c["hint"] for c in confessions)
        # A listed address, in a range the operator allowed, is reached.
        _, _, sock = await proxy_for([f"127.0.0.1:{web.port}"], egress_allow_cidrs="127.0.0.1/32")
        assert (await https_get(sock, ca, "127.0.0.1", web.port)).endswith(BODY)


async def test_failures_are_events_without_confessions(proxy_for: Any) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    _, rec, sock = await proxy_for(["no-such-host.invalid", f"localhost:{closed_port}"],
                                   egress_allow_cidrs="127.0.0.0/8")
    status, _, reader, _ = await ask(sock, b"CONNECT no-such-host.invalid:443 HTTP/1.1\r\n\r\n")
    assert status == 502 and b"cannot resolve no-such-host.invalid" in await reader.read()
    status, _, reader, _ = await ask(sock, f"CONNECT localhost:{closed_port} HTTP/1.1\r\n\r\n"
                                     .encode())
    assert status == 502 and b"Connection refused" in await reader.read()
    status, _, reader, _ = await ask(sock, b"GET / HTTP/1.1\r\n\r\n")
    assert status == 400 and b"absolute http:// URL" in await reader.read()
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(b"GET http://x/" + b"a" * 20_000)
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 431 ")
    events = await eventually(lambda: _aw(len(rec.events) == 4 and rec.events),
                              what="four events")
    assert [e.allowed for e in events] == [False] * 4
    assert rec.confessions == []


async def test_a_flood_is_capped_in_events_and_in_connections(
    proxy_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(egress_connection, "HEAD_TIMEOUT_S", 1.0)
    proxy, rec, sock = await proxy_for(["api.example.com"], egress_max_events=3,
                                       egress_max_connections=2)
    for _ in range(5):
        status, _, _, writer = await ask(sock, b"CONNECT nope.example:443 HTTP/1.1\r\n\r\n")
        writer.close()
        assert status == 403
    metrics = proxy._metrics
    dropped = metrics.egress_events_dropped._value
    await eventually(lambda: _aw(len(rec.confessions) == 2 and dropped.get() == 2),
                     what="two confessions, two events dropped")
    assert len(rec.events) == 3
    assert [c["category"] for c in rec.confessions] == ["egress_refused", "egress_events_capped"]
    assert "more than 3 connections" in rec.confessions[1]["summary"]
    assert metrics.egress_connections.labels("refused")._value.get() == 5
    # Two connections held open (silent: no head yet) take both slots: the third waits
    # in the socket's backlog, costing the executor nothing, until one is free.
    held = [await asyncio.open_unix_connection(str(sock)) for _ in range(2)]
    await eventually(lambda: _aw(len(proxy._open) == 2), what="two open")
    third = asyncio.create_task(ask(sock, b"CONNECT nope.example:443 HTTP/1.1\r\n\r\n"))
    answers = [asyncio.create_task(r.read()) for r, _ in held]
    # The silent ones are answered 400 when their head does not come in time ...
    done, _ = await asyncio.wait({third, *answers}, timeout=15,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert third not in done
    for answer in answers:
        assert (await asyncio.wait_for(answer, 10)).startswith(b"HTTP/1.1 400 ")
    # ... and then the third gets its turn.
    status, _, _, writer = await asyncio.wait_for(third, 10)
    assert status == 403
    writer.close()
    for _, w in held:
        w.close()


async def test_close_cuts_open_tunnels_and_records_them(proxy_for: Any) -> None:
    async with web_server() as web:
        proxy, rec, sock = await proxy_for([f"localhost:{web.port}"],
                                           egress_allow_cidrs="127.0.0.0/8")
        status, _, reader, writer = await ask(
            sock, f"CONNECT localhost:{web.port} HTTP/1.1\r\n\r\n".encode())
        assert status == 200
        writer.write(b"GET /bytes/100 HTTP/1.1\r\n")  # the head is never finished
        await writer.drain()
        await eventually(lambda: _aw(web.received == 25), what="the bytes upstream")
        await proxy.close()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the agent's side is closed
        (event,) = rec.events
        assert event.allowed and event.bytes_out == len(b"GET /bytes/100 HTTP/1.1\r\n")
        assert not sock.exists()
        await proxy.close()  # idempotent


# the relay, on this host -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_relay(sock: Path, port: int, code: str,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if not RELAY.exists():
        pytest.fail(f"{RELAY} is missing: run ./dev setup (scripts/setup-host.sh builds it)")
    return subprocess.run([str(RELAY), "-p", str(port), str(sock), "--", sys.executable, "-c",
                           code], capture_output=True, text=True, timeout=timeout, check=False)


CLIENT = """
import json, os, socket, sys
out = {"pid": os.getpid()}
s = socket.create_connection(("127.0.0.1", PORT))
s.sendall(b"CONNECT localhost:WEB HTTP/1.1\\r\\n\\r\\n"
          b"GET /bytes/3000000 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
data = b""
while chunk := s.recv(1 << 16):
    data += chunk
out["status"] = data.split(b"\\r\\n", 1)[0].decode()
out["size"] = len(data)
print(json.dumps(out))
sys.exit(7)
"""


async def test_the_relay_carries_connections_and_becomes_the_agent(proxy_for: Any) -> None:
    async with web_server() as web:
        _, rec, sock = await proxy_for([f"localhost:{web.port}"], egress_allow_cidrs="127.0.0.0/8")
        port = free_port()
        code = CLIENT.replace("PORT", str(port)).replace("WEB", str(web.port))
        done = await asyncio.to_thread(run_relay, sock, port, code)
        assert done.returncode == 7, done.stderr  # the agent's own exit status
        out = json.loads(done.stdout)
        assert out["status"] == "HTTP/1.1 200 Connection established"
        assert out["size"] > 3_000_000
        (event,) = await eventually(lambda: _aw(rec.events), what="the egress event")
        assert event.bytes_in == out["size"] - len(b"HTTP/1.1 200 Connection established\r\n\r\n")
        # The relay ended with the agent: nothing listens on its port any more.
        with pytest.raises(ConnectionRefusedError):
            await eventually(lambda: _connects(port), timeout=5, what="the port to close")


async def _connects(port: int) -> bool:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return False


async def test_the_relay_fails_closed_and_says_why(tmp_path: Path) -> None:
    """No proxy at the socket (gone, or never there): the agent's connections are closed
    at once and the agent's log says why; the agent still runs, with no way out."""
    port = free_port()
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\n"
            "try:\n    s.sendall(b'CONNECT x:443 HTTP/1.1\\r\\n\\r\\n')\n"
            "    print(repr(s.recv(100)))\nexcept ConnectionResetError:\n    print('reset')")
    done = await asyncio.to_thread(run_relay, tmp_path / "gone.sock", port, code)
    # Closed (or reset, when the request came before the close): nothing gets through.
    assert done.returncode == 0 and done.stdout.strip() in ("b''", "reset"), done.stderr
    assert f"vigil-relay: cannot reach the egress proxy at {tmp_path}/gone.sock: No such " \
        "file or directory" in done.stderr
    missing = await asyncio.to_thread(
        subprocess.run, [str(RELAY), "-p", str(free_port()), "/x.sock", "--", "no-such-agent"],
        capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 127
    assert missing.stderr == "vigil-relay: cannot run no-such-agent: No such file or directory\n"
    usage = await asyncio.to_thread(subprocess.run, [str(RELAY), "/x.sock", "true"],
                                    capture_output=True, text=True, timeout=30, check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: vigil-relay")


async def test_the_node_copies_its_relay_and_hands_work_back_without_one(tmp_path: Path) -> None:
    published = []

    async def publish(confession: Any) -> None:
        published.append(confession)

    node = EgressNode(ExecutorSettings(node_id="n1", egress_relay=str(RELAY)), Metrics())
    await node.prepare(tmp_path, publish)
    assert node.relay == tmp_path / "relay" / "vigil-relay" and published == []
    assert os.stat(node.relay).st_mode & 0o777 == 0o755
    copied, source = await asyncio.gather(asyncio.to_thread(node.relay.read_bytes),
                                          asyncio.to_thread(RELAY.read_bytes))
    assert copied == source
    bare = EgressNode(ExecutorSettings(node_id="n1", egress_relay=str(tmp_path / "nope")),
                      Metrics())
    await bare.prepare(tmp_path / "other", publish)
    (said,) = published
    assert said.category == "egress_unavailable" and said.severity == "error"
    assert said.summary == (f"node n1 cannot give tasks egress: its egress relay "
                            f"{tmp_path}/nope cannot be used (No such file or directory)")
    work = WorkItem(task_id="t", tenant="acme", submitted_at=datetime.now(UTC),
                    spec=TaskSpec(command=["true"], egress=Egress(allow=["x.org"])))
    with pytest.raises(egress_mod.EgressUnavailable, match="cannot give the task egress"):
        await bare.open(work, 1, tmp_path, runtime="podman", emit=print, confess=publish)
    plain = WorkItem(task_id="t", tenant="acme", submitted_at=datetime.now(UTC),
                     spec=TaskSpec(command=["true"]))
    assert await bare.open(plain, 1, tmp_path, runtime="podman", emit=print,
                           confess=publish) is None
