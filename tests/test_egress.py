"""Egress by allow-list, end to end: agents in real rootless Podman containers reach
servers on this host through the executor's proxy, or are refused; real nats-server with
the shipped permissions (a violation fails the test)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from egress_support import BODY, CertAuthority, WebServer, make_ca, web_server

from support import Platform, eventually
from vigil.embedded import PodmanService
from vigil_executor.service import Executor

pytestmark = [pytest.mark.integration, pytest.mark.podman]

AGENT = r"""
import json, os, socket, ssl, urllib.error, urllib.request
out = {"env": {k: os.environ.get(k) for k in (
    "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY", "no_proxy",
    "VIGIL_EGRESS_SOCKET")},
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "socket": os.path.exists("/run/vigil/egress.sock")}
ca = "/tmp/ca.pem"
with open(ca, "w") as f:
    f.write(os.environ.get("EGRESS_CA", ""))
tls = ssl.create_default_context(cafile=ca) if os.environ.get("EGRESS_CA") else None

def get(url):
    try:
        with urllib.request.urlopen(url, context=tls if url.startswith("https") else None,
                                    timeout=20) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {getattr(e, 'reason', e)}"}

def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"

for name, url in json.loads(os.environ.get("EGRESS_URLS", "{}")).items():
    out[name] = get(url)
def tunnel(target):
    # As a tool that ignores NO_PROXY would ask (curl -x, say): the proxy decides anyway.
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n")[0]:
            s.settimeout(5)
            while chunk := s.recv(4096):
                body += chunk
        s.close()
        return {"status": head.split(b"\r\n")[0].decode(), "body": body.decode()}
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e.strerror or e}"}

for name, (host, port) in json.loads(os.environ.get("EGRESS_SOCKETS", "{}")).items():
    out[name] = connect(host, port)
for name, target in json.loads(os.environ.get("EGRESS_TUNNELS", "{}")).items():
    out[name] = tunnel(target)
try:
    socket.getaddrinfo("example.com", 443)
    out["dns"] = "resolved"
except OSError as e:
    out["dns"] = f"{type(e).__name__}"
print("RESULT " + json.dumps(out), flush=True)
"""

PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")


@dataclass(frozen=True)
class Host:
    """This machine as agents reach it: by its own name (``localhost`` is in the agents'
    NO_PROXY: for them it is the container itself) and the address that name has here."""

    name: str
    address: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/32"


@pytest.fixture(scope="module")
def host() -> Host:
    name = socket.gethostname()
    try:
        address = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError as exc:
        pytest.fail(f"this host's name {name!r} does not resolve here ({exc}); the egress "
                    "tests reach this host by its name")
    assert name.lower() != "localhost", "the egress tests need a host name other than localhost"
    return Host(name=name, address=str(address))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory, host: Host) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("egress-ca"), names=(host.name, "localhost"),
                   addresses=(host.address, "127.0.0.1"))


@pytest.fixture
async def https(ca: CertAuthority, host: Host) -> AsyncIterator[WebServer]:
    """An HTTPS server on the address this host's name has (loopback here)."""
    async with web_server(ca, host.address) as web:
        yield web


async def podman_executor(platform: Platform, podman: PodmanService, **overrides: Any
                          ) -> Executor:
    return await platform.executor(**{"runtime": "podman", "unsafe_runtime": False,
                                      "podman_url": podman.url, **overrides})


async def run_agent(platform: Platform, task_id: str, *, egress: list[str] | None = None,
                    urls: dict[str, str] | None = None,
                    sockets: dict[str, tuple[str, int]] | None = None,
                    tunnels: dict[str, str] | None = None,
                    ca: CertAuthority | None = None) -> dict[str, Any]:
    """Run AGENT as task ``task_id``; its RESULT line, once the task succeeded."""
    env = {"EGRESS_URLS": json.dumps(urls or {}), "EGRESS_SOCKETS": json.dumps(sockets or {}),
           "EGRESS_TUNNELS": json.dumps(tunnels or {})}
    if ca is not None:
        env["EGRESS_CA"] = ca.pem  # the agent trusts the test's CA through a file
    spec: dict[str, Any] = {"id": task_id, "command": ["python3", "-c", AGENT], "env": env,
                            "max_attempts": 1}
    if egress is not None:
        spec["egress"] = {"allow": egress}
    await platform.publish_spec(spec)
    state = await platform.final_state(task_id, timeout=90)
    lines = [line for e in platform.events.of(task_id, "log") for line in e["lines"]]
    assert state.status == "succeeded", (state.error, lines)
    result = next((line for line in lines if line.startswith("RESULT ")), None)
    assert result is not None, lines
    return dict(json.loads(result[7:]))


async def egress_events(platform: Platform, task_id: str, count: int) -> list[dict[str, Any]]:
    return await platform.events.wait_for(task_id, "egress", count, timeout=30)


async def refused_confessions(platform: Platform, task_id: str, count: int
                              ) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        found = [c for c in await platform.confessions("egress_refused")
                 if c.get("task_id") == task_id]
        return found if len(found) >= count else None

    return await eventually(probe, timeout=30, what=f"{count} egress_refused confessions")


async def test_an_agent_reaches_an_allowed_host_and_nothing_else(
    platform: Platform, podman: PodmanService, agent_image: str, ca: CertAuthority,
    https: WebServer, host: Host,
) -> None:
    """HTTPS (CONNECT, the agent's own TLS with the test's CA) and plain HTTP to an
    allowed host on this machine (whose address the operator allows here); a host not on
    the list (twice: confessed once) and raw IPs not listed are refused."""
    await platform.scheduler()
    ex = await podman_executor(platform, podman, egress_allow_cidrs=host.cidr)
    p, name = https.port, host.name
    async with web_server(host=host.address) as plain:
        result = await run_agent(
            platform, "egress-ok", ca=ca,
            egress=[f"{name}:{p}", f"{name.upper()}:{plain.port}"],
            urls={"https": f"https://{name}:{p}/", "http": f"http://{name}:{plain.port}/",
                  "unlisted": f"https://not-listed.example:{p}/",
                  "unlisted_again": f"https://not-listed.example:{p}/x",
                  "raw_ip": f"https://203.0.113.5:{p}/"},
            tunnels={"raw_ip_of_the_host": f"{host.address}:{p}"},
            sockets={"direct": (host.address, p)})
    # The container: loopback only, the proxy in its environment, the socket mounted.
    assert result["interfaces"] == ["lo"]
    assert all(result["env"][k] == "http://127.0.0.1:3128" for k in PROXY_ENV)
    assert result["env"]["NO_PROXY"] == result["env"]["no_proxy"] == "localhost,127.0.0.1,::1"
    assert result["env"]["VIGIL_EGRESS_SOCKET"] == "/run/vigil/egress.sock" and result["socket"]
    assert result["https"] == {"status": 200, "body": BODY.decode()}
    assert result["http"] == {"status": 200, "body": BODY.decode()}
    for key in ("unlisted", "unlisted_again", "raw_ip"):
        assert result[key] == {"error": "URLError: Tunnel connection failed: 403 Forbidden"}
    listed_itself = (f"{host.address}:{p}: an address is reached only if it is listed itself, "
                     "and it is not on the task's egress list")
    assert result["raw_ip_of_the_host"] == {"status": "HTTP/1.1 403 Forbidden",
                                            "body": f"vigil egress: {listed_itself}\n"}
    # Its own loopback is not the host's, nor is there a route anywhere; and no DNS.
    assert result["direct"] in ("ConnectionRefusedError: Connection refused",
                                "OSError: Network is unreachable")
    assert result["dns"] == "gaierror"
    events = await egress_events(platform, "egress-ok", 6)
    assert sorted((e["host"], e["port"], e["allowed"]) for e in events) == sorted([
        (name.lower(), p, True), (name.lower(), plain.port, True),
        ("not-listed.example", p, False), ("not-listed.example", p, False),
        ("203.0.113.5", p, False), (host.address, p, False)])
    ok = next(e for e in events if e["allowed"] and e["port"] == p)
    assert ok["address"] == host.address
    assert ok["bytes_in"] > len(BODY) and ok["bytes_out"] > 0 and ok["reason"] is None
    refused = next(e for e in events if e["host"] == host.address)
    assert refused["reason"] == listed_itself and refused["address"] is None
    # Confessed once per host, with the rule that would allow it.
    confessions = await refused_confessions(platform, "egress-ok", 3)
    assert len(confessions) == 3
    unlisted = next(c for c in confessions if "not-listed.example" in c["summary"])
    assert unlisted["summary"] == (f"task egress-ok was refused egress to not-listed.example:{p}"
                                   f": not-listed.example:{p}: not on the task's egress list")
    assert f'egress.allow += ["not-listed.example:{p}"]' in unlisted["hint"]
    assert (unlisted["source"], unlisted["severity"], unlisted["tenant"]) == (
        "executor", "warning", "acme")
    assert unlisted["node"] == ex.settings.node_id
    # The proxy's books agree.
    connections = ex.metrics.egress_connections
    assert connections.labels("allowed")._value.get() == 2
    assert connections.labels("refused")._value.get() == 4
    # The attempt's proxy is gone with it.
    sockets = await asyncio.to_thread(lambda: list(ex.state_dir.glob("control/*/egress.sock")))
    assert sockets == []


async def test_an_allowed_name_that_resolves_to_loopback_is_refused(
    platform: Platform, podman: PodmanService, agent_image: str, https: WebServer,
) -> None:
    """No operator range: the executor's own loopback is not a way in, listed or not."""
    await platform.scheduler()
    await podman_executor(platform, podman)
    target = f"localhost:{https.port}"
    result = await run_agent(platform, "egress-loop", egress=[target],
                             tunnels={"loopback": target})
    why = f"{target}: localhost resolves to a loopback address"
    assert result["loopback"] == {"status": "HTTP/1.1 403 Forbidden",
                                  "body": f"vigil egress: {why}\n"}
    assert https.heads == [] and https.received == 0  # never connected
    (event,) = await egress_events(platform, "egress-loop", 1)
    assert (event["allowed"], event["address"], event["reason"]) == (False, None, why)
    (confession,) = await refused_confessions(platform, "egress-loop", 1)
    assert "VIGIL_EGRESS_ALLOW_CIDRS" in confession["hint"]
    assert "127.0.0.1/32" in confession["hint"]


async def test_an_agent_without_egress_has_no_way_out(
    platform: Platform, podman: PodmanService, agent_image: str, https: WebServer,
) -> None:
    await platform.scheduler()
    await podman_executor(platform, podman, egress_allow_cidrs="0.0.0.0/0")
    result = await run_agent(platform, "no-egress", sockets={
        "relay_port": ("127.0.0.1", 3128), "public": ("93.184.216.34", 443),
        "slirp_host": ("10.0.2.2", https.port)})
    assert result["env"] == dict.fromkeys(result["env"])  # no proxy variable at all
    assert result["socket"] is False and result["interfaces"] == ["lo"]
    assert result["relay_port"] == "ConnectionRefusedError: Connection refused"
    assert result["public"] == result["slirp_host"] == "OSError: Network is unreachable"
    assert result["dns"] == "gaierror"
    assert platform.events.of("no-egress", "egress") == []


async def test_a_node_without_its_relay_hands_egress_tasks_back(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path,
    ca: CertAuthority, https: WebServer, host: Host,
) -> None:
    """Never run an egress task without its way out, nor charge it for the node's fault:
    hand it back (no attempt spent) and say why; a node that has the relay runs it."""
    await platform.scheduler()
    broken = await podman_executor(platform, podman, egress_relay=str(tmp_path / "no-relay"),
                                   egress_allow_cidrs=host.cidr)
    node = broken.settings.node_id
    target = f"{host.name}:{https.port}"
    await platform.publish_spec({"id": "egress-later", "command": ["python3", "-c", AGENT],
                                 "egress": {"allow": [target]},
                                 "env": {"EGRESS_CA": ca.pem, "EGRESS_URLS": json.dumps(
                                     {"https": f"https://{target}/"})}})
    (retrying,) = await platform.events.wait_for("egress-later", "retrying", 1, timeout=60)
    assert retrying["reason"].startswith(f"node {node} cannot give the task egress: its egress "
                                         f"relay {tmp_path}/no-relay cannot be used")

    async def unavailable() -> list[dict[str, Any]] | None:
        found = await platform.confessions("egress_unavailable")
        return found if len(found) >= 2 else None

    said = await eventually(unavailable, what="the node's and the task's confessions")
    assert {c.get("task_id") for c in said} == {None, "egress-later"}
    assert all("scripts/setup-host.sh" in c["hint"] for c in said)
    state = await platform.state("egress-later")
    assert state is not None and state.history[-1].outcome == "handed_back"
    assert platform.events.of("egress-later", "started") == []  # the agent never ran
    await broken.shutdown()
    await podman_executor(platform, podman, egress_allow_cidrs=host.cidr)
    state = await platform.final_state("egress-later", timeout=90)
    assert state.status == "succeeded", state.error
    assert [r.outcome for r in state.history] == ["handed_back", "succeeded"]
    lines = [line for e in platform.events.of("egress-later", "log") for line in e["lines"]]
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    assert result["https"] == {"status": 200, "body": BODY.decode()}


async def test_a_command_the_image_lacks_fails_as_the_relay_s_exec(
    platform: Platform, podman: PodmanService, agent_image: str,
) -> None:
    """With egress the relay runs the command (exec in its place): one the image lacks is
    exit 127 with the relay's line, as a shell says it (docs/decisions/0013)."""
    await platform.scheduler()
    await podman_executor(platform, podman)
    await platform.publish_spec({"id": "no-cmd", "command": ["no-such-command", "x"],
                                 "egress": {"allow": ["example.com"]}, "max_attempts": 1})
    state = await platform.final_state("no-cmd", timeout=90)
    assert (state.status, state.exit_code) == ("failed", 127)
    assert state.error == ("agent exited with code 127; last output: vigil-relay: cannot run "
                           "no-such-command: No such file or directory; 1 of 1 attempts "
                           "failed")
