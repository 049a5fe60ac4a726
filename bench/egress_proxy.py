"""The egress proxy's cost: a download and a connection's setup through Vigil's proxy
(alone, and with the in-container relay in front of it, the agent's whole path) against
the same without any proxy, and against well-kept proxies, all in one run.

    .venv/bin/python bench/egress_proxy.py                       # 100 MB x 5, 200 setups
    .venv/bin/python bench/egress_proxy.py --quick
    .venv/bin/python bench/egress_proxy.py --tinyproxy /path/to/tinyproxy \\
        --proxy-py /path/to/venv/bin/proxy

Paths (each a separate process from the client and from the server, all on loopback):

- ``direct``: client -> server (the baseline every ratio is against);
- ``vigil``: client -> the task's unix socket -> Vigil's proxy (this process, as in the
  executor) -> server;
- ``vigil+relay``: client -> TCP 127.0.0.1 -> vigil-relay -> unix socket -> Vigil's proxy
  -> server: what an agent's tool does in its container;
- ``proxy.py`` (PyPI, on a unix socket) and ``tinyproxy`` (Debian, TCP), when given.

Every path uses HTTP CONNECT (a tunnel), as HTTPS does. Throughput is a 100 MB download
(median [min-max] of R runs, interleaved); setup is connect + CONNECT + a 2-byte request
until the first byte of its answer (median and p90 of N, sequential); CPU is the proxy's
own (this process for Vigil's; its process tree otherwise; the relay's added for
vigil+relay) per GB relayed. Vigil's proxy emits its events into a list here: the
executor's NATS publish (pipelined, once per connection) is not in these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchError, environment, run_main, say, table, write_json

MB = 1024 * 1024
CLK = os.sysconf("SC_CLK_TCK")


# the server and the client: processes of their own ---------------------------------------
class _Bytes(socketserver.BaseRequestHandler):
    """``GET /bytes/<n>``: an HTTP answer with n bytes."""

    chunk = memoryview(b"x" * MB)

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.request.recv(4096)
            if not data:
                return
            head += data
        size = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        while size > 0:
            n = min(size, len(self.chunk))
            self.request.sendall(self.chunk[:n])
            size -= n


def serve() -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Bytes) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


def _open(via: str, target: str) -> socket.socket:
    """A connection to ``target`` (host:port): direct, or tunnelled by CONNECT through the
    proxy at ``via`` (``unix:/path`` or ``tcp:port``)."""
    kind, _, where = via.partition(":")
    if kind == "direct":
        host, port = target.rsplit(":", 1)
        return socket.create_connection((host, int(port)))
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(where)
    else:
        s = socket.create_connection(("127.0.0.1", int(where)))
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = s.recv(4096)
        if not data:
            raise OSError(f"the proxy at {via} closed: {head!r}")
        head += data
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise OSError(f"the proxy at {via} refused: {head!r}")
    return s


def _get(s: socket.socket, size: int, buf: bytearray) -> int:
    s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: bench\r\n\r\n" % size)
    view = memoryview(buf)
    head = b""
    while b"\r\n\r\n" not in head:
        n = s.recv_into(view)
        if n == 0:
            raise OSError("closed before the answer's head")
        head += bytes(view[:n])
    got = len(head) - head.index(b"\r\n\r\n") - 4
    while got < size:
        n = s.recv_into(view)
        if n == 0:
            raise OSError(f"closed after {got} of {size} bytes")
        got += n
    return got


def client(via: str, target: str, what: str, size: int, count: int) -> None:
    buf = bytearray(MB)
    out: dict[str, Any] = {}
    if what == "download":
        t0 = time.perf_counter()
        with _open(via, target) as s:
            _get(s, size, buf)
        out["seconds"] = time.perf_counter() - t0
    else:
        samples = []
        for _ in range(count):
            t0 = time.perf_counter()
            with _open(via, target) as s:
                _get(s, 2, buf)
                samples.append(time.perf_counter() - t0)
        out["samples"] = samples
    print(json.dumps(out), flush=True)


# the run ----------------------------------------------------------------------------------
@dataclass
class Path_:
    name: str
    via: str
    pids: list[int] = field(default_factory=list)  # whose CPU is the proxy's
    in_process: bool = False  # Vigil's proxy: this process's CPU counts too
    mbps: list[float] = field(default_factory=list)
    setup: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    relayed: int = 0


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants, now."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_now(path: Path_) -> float:
    return (self_cpu() if path.in_process else 0.0) + sum(tree_cpu(p) for p in path.pids)


async def run_client(via: str, target: str, what: str, size: int = 0, count: int = 0
                     ) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", via, target, what, str(size), str(count),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"client via {via} failed: {err.decode()[-800:]}")
    return dict(json.loads(out))


@contextlib.asynccontextmanager
async def process(*argv: str, ready: Callable[[str], bool] | None = None,
                  **kw: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """A helper process we start and stop ourselves (by its pid, nothing else)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, **kw)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            await asyncio.sleep(0.05)


async def wait_path(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear within {timeout}s")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench(args: argparse.Namespace) -> int:
    from vigil.messages import Egress, TaskSpec, WorkItem
    from vigil_executor.egress import EgressMount, EgressNode, EgressProxy
    from vigil_executor.metrics import Metrics
    from vigil_executor.settings import ExecutorSettings

    relay = shutil.which(args.relay) or args.relay
    if not os.access(relay, os.X_OK):
        raise BenchError(f"no vigil-relay at {relay}: run ./dev setup")
    size = args.megabytes * MB
    tmp = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(process(sys.executable, __file__, "--serve"))
        assert server.stdout is not None
        port = int((await asyncio.wait_for(server.stdout.readline(), 20)).decode())
        target = f"localhost:{port}"
        # Vigil's proxy, as the executor runs it for one attempt.
        conf = ExecutorSettings(node_id="bench", egress_allow_cidrs="127.0.0.0/8",
                                egress_max_events=1_000_000, egress_max_connections=10_000)
        node = EgressNode(conf, Metrics())
        work = WorkItem(task_id="bench", tenant="bench", submitted_at=datetime.now(UTC),
                        spec=TaskSpec(command=["true"], egress=Egress(allow=[target])))
        events: list[Any] = []

        async def confess(*_: Any, **__: Any) -> None:
            return None

        from vigil.egress import parse_rules
        proxy = EgressProxy(work, 1, parse_rules([target]), node, emit=events.append,
                            confess=confess, mount=EgressMount(relay=relay))
        await proxy.start(tmp)
        stack.push_async_callback(proxy.close)
        sock = tmp / "egress.sock"
        paths = [Path_("direct", "direct:"), Path_("vigil", f"unix:{sock}", in_process=True)]
        relay_port = free_port()
        relay_proc = await stack.enter_async_context(
            process(relay, "-p", str(relay_port), str(sock), "--", "sleep", "86400"))
        await wait_port(relay_port)
        paths.append(Path_("vigil+relay", f"tcp:{relay_port}", pids=[relay_proc.pid],
                           in_process=True))
        if args.proxy_py:
            pp_sock = tmp / "proxy-py.sock"
            pp = await stack.enter_async_context(process(
                args.proxy_py, "--unix-socket-path", str(pp_sock), "--num-acceptors", "1",
                "--log-level", "ERROR", cwd=tmp))
            await wait_path(pp_sock)
            paths.append(Path_("proxy.py", f"unix:{pp_sock}", pids=[pp.pid]))
        if args.tinyproxy:
            tp_port = free_port()
            conf_file = tmp / "tinyproxy.conf"
            conf_file.write_text(f"Port {tp_port}\nListen 127.0.0.1\nTimeout 600\n"
                                 "MaxClients 100\nLogLevel Critical\nAllow 127.0.0.1\n"
                                 f"PidFile \"{tmp}/tinyproxy.pid\"\n")
            tp = await stack.enter_async_context(process(args.tinyproxy, "-d", "-c",
                                                         str(conf_file)))
            await wait_port(tp_port)
            paths.append(Path_("tinyproxy", f"tcp:{tp_port}", pids=[tp.pid]))
        say(f"paths: {', '.join(p.name for p in paths)}; warming up")
        for path in paths:
            await run_client(path.via, target, "download", 8 * MB)
            await run_client(path.via, target, "setup", count=20)
        for r in range(args.repeats):
            say(f"download {args.megabytes} MB, run {r + 1}/{args.repeats}")
            for path in paths:
                before = cpu_now(path)
                got = await run_client(path.via, target, "download", size)
                path.cpu_s += cpu_now(path) - before
                path.relayed += size
                path.mbps.append(size / MB / got["seconds"])
        say(f"connection setup, {args.setups} sequential per path")
        for path in paths:
            got = await run_client(path.via, target, "setup", count=args.setups)
            path.setup = [s * 1000 for s in got["samples"]]
    shutil.rmtree(tmp, ignore_errors=True)
    report(paths, args, len(events))
    return 0


def report(paths: list[Path_], args: argparse.Namespace, events: int) -> None:
    base = paths[0]
    base_mbps = statistics.median(base.mbps)
    base_setup = statistics.median(base.setup)
    rows = [("path", "MB/s, median [min-max]", "ratio", "setup ms, median (p90)", "ratio",
             "proxy CPU s/GB")]
    results: dict[str, Any] = {}
    for p in paths:
        mbps, setup = statistics.median(p.mbps), statistics.median(p.setup)
        p90 = statistics.quantiles(p.setup, n=10)[-1]
        cpu = "-" if p is base else f"{p.cpu_s / (p.relayed / 1024**3):.2f}"
        rows.append((p.name, f"{mbps:,.0f} [{min(p.mbps):,.0f}-{max(p.mbps):,.0f}]",
                     f"{mbps / base_mbps:.2f}", f"{setup:.3f} ({p90:.3f})",
                     f"{setup / base_setup:.1f}", cpu))
        results[p.name] = {"mbps": p.mbps, "setup_ms": p.setup, "cpu_s": p.cpu_s,
                           "relayed_bytes": p.relayed}
    print(table(rows))
    print(f"\n{args.megabytes} MB downloads x {args.repeats} (interleaved), {args.setups} "
          f"setups per path; ratios against direct; {events} egress events recorded by "
          "Vigil's proxy.")
    path = write_json(f"egress-proxy-{datetime.now(UTC):%Y%m%dT%H%M%SZ}", {
        "params": vars(args), "paths": results, "environment": environment(podman=False)})
    say(f"results in {path}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve()
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        via, target, what, size, count = sys.argv[2:7]
        client(via, target, what, int(size), int(count))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="20 MB x 3, 50 setups")
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--setups", type=int, default=200)
    parser.add_argument("--relay", default="/usr/local/libexec/vigil/vigil-relay")
    parser.add_argument("--tinyproxy", help="a tinyproxy binary (Debian's tinyproxy-bin)")
    parser.add_argument("--proxy-py", help="proxy.py's `proxy` command (PyPI proxy.py)")
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.repeats, args.setups = 20, 3, 50
    return run_main(lambda: bench(args), failed="egress benchmark failed")


if __name__ == "__main__":
    sys.exit(main())
