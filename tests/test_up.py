"""`vigil up` as a user runs it: a subprocess, the CLI against it, then Ctrl-C/SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import eventually, eventually_sync, violations

pytestmark = [pytest.mark.e2e, pytest.mark.podman, pytest.mark.slow]

VIGIL = str(Path(sys.executable).parent / "vigil")


def free_ports(count: int, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A base port with ``count`` consecutive free ports (none of them in ``avoid``)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65_000 or avoid & set(range(base, base + count)):
            continue
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return {int(x) for x in out.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_for_line(proc: subprocess.Popen[str], needle: str, seen: list[str],
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while (left := deadline - time.monotonic()) > 0:
        line = proc.stdout.readline()
        if line:
            seen.append(line.rstrip("\n"))
            if needle in line:
                return
            continue
        if proc.poll() is not None:
            break
        select.select([proc.stdout], [], [], left)  # wakes on the next output
    raise AssertionError(f"{needle!r} not printed within {timeout}s; output:\n" + "\n".join(seen))


async def raw_submit(url: str, inbox_prefix: str) -> str:
    """The README's raw client: the default tenant's own NATS user, its inbox prefix, a
    publish, and the task's state read by a direct get of its key."""
    import nats

    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc = await nats.connect(url, error_cb=on_error, inbox_prefix=inbox_prefix.encode())
    try:
        js = nc.jetstream()
        await js.publish("vigil.submit.default", b'{"command": ["true"]}',
                         headers={"Nats-Msg-Id": "raw-submit-1"})

        async def finished() -> str | None:
            reply = await nc.request(
                "$JS.API.DIRECT.GET.KV_vigil-tasks.$KV.vigil-tasks.default.raw-submit-1", b"",
                timeout=2)
            if not reply.data:
                return None
            status = json.loads(reply.data)["status"]
            return str(status) if status in ("succeeded", "failed") else None

        status = await eventually(finished, timeout=10, what="the raw submission to finish")
        await nc.publish("vigil.work.default", b"{}")  # not allowed: work is the scheduler's
        await nc.publish("vigil.submit.other", b"{}")  # nor another tenant's door
        await nc.flush()

        async def refused() -> bool:
            return sum("permissions violation" in v.lower() for v in violations) >= 2

        await eventually(refused, timeout=2, what="two permissions violations")
        return status
    finally:
        await nc.close()


async def tenant_submit(url: str, tenant: str) -> str:
    """A tenant's own user submits as its tenant and reads the state back."""
    import nats

    nc = await nats.connect(url, inbox_prefix=f"_INBOX_T.{tenant}".encode())
    try:
        await nc.jetstream().publish(f"vigil.submit.{tenant}", b'{"command": ["true"]}',
                                     headers={"Nats-Msg-Id": "new-tenant-1"})

        async def finished() -> str | None:
            reply = await nc.request(
                f"$JS.API.DIRECT.GET.KV_vigil-tasks.$KV.vigil-tasks.{tenant}.new-tenant-1",
                b"", timeout=2)
            status = json.loads(reply.data)["status"] if reply.data else None
            return str(status) if status in ("succeeded", "failed") else None

        return await eventually(finished, timeout=10, what="the new tenant's task")
    finally:
        await nc.close()


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    # Options go before the command: everything after `--` belongs to the task.
    return subprocess.run([VIGIL, args[0], "--data-dir", str(data_dir), *args[1:]],
                          capture_output=True,
                          text=True, timeout=120, check=False)


def test_up_demo_cli_and_clean_stop(tmp_path: Path, agent_image: str) -> None:
    data = tmp_path / "stack"
    http = free_ports(4)
    nats_port = free_ports(1)
    proc = subprocess.Popen(
        [VIGIL, "up", "--demo", "--data-dir", str(data), "--http-port", str(http),
         "--nats-port", str(nats_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen: list[str] = []
    try:
        wait_for_line(proc, "Submit more tasks", seen, timeout=120)
        text = "\n".join(seen)
        assert "hello from Vigil task" in text and "demo finished" in text
        assert "succeeded" in text

        done = run_cli("submit", "--wait", "--", "sh", "-c", "echo via-cli", data_dir=data)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "via-cli" in done.stdout and "succeeded" in done.stdout

        # Secrets work with no setup: `vigil up` made the key (0600) and gave it to the
        # gateway and the executor; the agent gets the value, its output shows ***.
        assert stat.S_IMODE((data / "secrets.key").stat().st_mode) == 0o600
        secret = "up-quickstart-s3cret"
        done = subprocess.run([VIGIL, "--data-dir", str(data), "secret", "set", "up-key"],
                              input=secret + "\n", capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        task_file = tmp_path / "secret-task.yaml"
        task_file.write_text("command: [sh, -c, 'cat /run/secrets/TOKEN; echo; echo $TOKEN']\n"
                             "secrets: {TOKEN: up-key}\n")
        done = run_cli("submit", "--wait", "-f", str(task_file), data_dir=data)
        assert done.returncode == 0, done.stdout + done.stderr
        assert secret not in done.stdout and done.stdout.count("***") >= 2, done.stdout

        failed = run_cli("submit", "--wait", "--", "sh", "-c", "exit 4", data_dir=data)
        assert failed.returncode == 1
        assert "failed" in failed.stdout
        # The platform confessed the silent failure; the auditor made it an incident.
        def incidents() -> str | None:
            out = run_cli("incidents", data_dir=data).stdout
            return out if "without any output" in out else None

        listed = eventually_sync(incidents, timeout=10, what="the silent failure's incident")
        assert "executor: agent exited with code <n> without any output" in listed
        # A platform incident (the executor's): the tenant's operator sees it but does not
        # act on it; the platform's operator (the token vigil up wrote) does.
        silent = next(line.split()[0] for line in listed.splitlines()
                      if "without any output" in line)
        refused = run_cli("incidents", "ack", silent, data_dir=data)
        assert refused.returncode == 2 and "platform" in refused.stderr, refused.stderr
        acked = run_cli("incidents", "ack", silent, "--platform", data_dir=data)
        assert acked.returncode == 0, acked.stderr
        assert "acknowledged" in acked.stdout or "ack recorded" in acked.stdout

        sub = run_cli("submit", "--json", "--", "true", data_dir=data)
        task_id = json.loads(sub.stdout)["id"]
        status = run_cli("status", task_id, data_dir=data)
        assert status.returncode == 0 and task_id in status.stdout

        bad = run_cli("submit", "--timeout", "-1", "--", "true", data_dir=data)
        assert bad.returncode == 2 and "timeout_s" in bad.stderr

        # A raw NATS client with the least-privilege submit user: it may submit and read
        # its task's state, and nothing else.
        client = json.loads((data / "client.json").read_text())
        assert asyncio.run(raw_submit(client["nats_submit_url"],
                                      client["nats_submit_inbox_prefix"])) == "succeeded"
        # A new tenant's NATS user works at once: the stack reloads nats-server's users.
        added = subprocess.run([VIGIL, "nats-user", "add", "--tenant", "acme", "--file",
                                str(data / "nats-users.json"), "--server",
                                f"127.0.0.1:{nats_port}"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert added.returncode == 0, added.stderr
        acme_url = added.stdout.strip()
        assert acme_url.startswith("nats://tenant-acme:") and "_INBOX_T.acme" in added.stderr
        wait_for_line(proc, "users reloaded", seen, timeout=10)
        assert asyncio.run(tenant_submit(acme_url, "acme")) == "succeeded"

        # A task still running when the stack stops: its container must not outlive it.
        long = run_cli("submit", "--json", "--", "sleep", "300", data_dir=data)
        long_id = json.loads(long.stdout)["id"]
        eventually_sync(lambda: json.loads(run_cli("status", long_id, "--json",
                                                   data_dir=data).stdout)["status"]
                        == "running", timeout=10, what="the long task to run")
        assert leftover_containers(data), "the long task's container should be running"

        kids = children_of(proc.pid)
        assert len(kids) >= 6  # podman, nats-server, four services
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "nothing left running" in out
    # Least privilege held: no service reached for a subject its NATS user may not use
    # (the server says; only the raw client's deliberate tries above are refused there).
    for log in (data / "logs").glob("*.log"):
        assert "permissions violation" not in log.read_text().lower(), log.name
    refused = violations(data / "nats" / "nats-server.log")
    assert refused and all(v.startswith("tenant-default: ") for v in refused), refused
    eventually_sync(lambda: not any(alive(k) for k in kids), timeout=10,
                    what="vigil up's children to exit (children survived vigil up)")
    assert leftover_containers(data) == [], "containers survived vigil up"


@dataclass
class UpProcess:
    """One `vigil up` (no demo) in a session of its own, as a terminal's foreground job."""

    name: str
    data: Path
    http_port: int
    nats_port: int
    proc: subprocess.Popen[str]
    seen: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, tmp_path: Path, name: str, taken: set[int]) -> UpProcess:
        http = free_ports(4, avoid=taken)
        taken |= set(range(http, http + 4))
        nats_port = free_ports(1, avoid=taken)
        taken.add(nats_port)
        data = tmp_path / name
        proc = subprocess.Popen(
            [VIGIL, "up", "--data-dir", str(data), "--http-port", str(http),
             "--nats-port", str(nats_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group, like a job in a terminal
        )
        return cls(name, data, http, nats_port, proc)

    def ready(self) -> None:
        wait_for_line(self.proc, "Submit more tasks", self.seen, timeout=120)

    def stop(self, sig: int) -> str:
        if sig == signal.SIGINT:
            # Ctrl-C: the terminal signals the whole foreground process group.
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return "\n".join(self.seen) + "\n" + out


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        kids = children_of(todo.pop())
        todo += kids - found
        found |= kids
    return found


def test_two_stacks_side_by_side_stop_by_ctrl_c_and_sigterm(
    tmp_path: Path, agent_image: str
) -> None:
    taken: set[int] = set()
    stacks = [UpProcess.start(tmp_path, "a", taken), UpProcess.start(tmp_path, "b", taken)]
    kids: dict[str, set[int]] = {}
    outputs: dict[str, str] = {}
    try:
        for stack in stacks:
            stack.ready()
            assert f"127.0.0.1:{stack.http_port}" in "\n".join(stack.seen)
        for stack in stacks:
            done = run_cli("submit", "--wait", "--", "sh", "-c", f"echo from-{stack.name}",
                           data_dir=stack.data)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"from-{stack.name}" in done.stdout and "succeeded" in done.stdout
        # Separate stacks: a task of one is unknown to the other.
        ran = run_cli("submit", "--json", "--", "true", data_dir=stacks[0].data)
        a_task = json.loads(ran.stdout)["id"]
        elsewhere = run_cli("status", a_task, data_dir=stacks[1].data)
        assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr  # 1: no such task
        assert run_cli("status", a_task, data_dir=stacks[0].data).returncode == 0
        # Each has a task running when it stops: its container must not outlive the stack.
        for stack in stacks:
            long = run_cli("submit", "--json", "--", "sleep", "300", data_dir=stack.data)
            long_id = json.loads(long.stdout)["id"]
            eventually_sync(lambda s=stack, t=long_id: json.loads(run_cli(
                "status", t, "--json", data_dir=s.data).stdout)["status"] == "running",
                timeout=20, what=f"stack {stack.name}'s long task to run")
            assert leftover_containers(stack.data)
            kids[stack.name] = descendants(stack.proc.pid)
            assert len(kids[stack.name]) >= 6  # podman, nats-server, four services
    finally:
        for stack, sig in zip(stacks, (signal.SIGINT, signal.SIGTERM), strict=True):
            if stack.proc.poll() is None:
                outputs[stack.name] = stack.stop(sig)
    for stack in stacks:
        out = outputs[stack.name]
        assert stack.proc.returncode == 0, out
        assert "nothing left running" in out, out
        eventually_sync(lambda s=stack: not any(alive(k) for k in kids[s.name]), timeout=10,
                        what=f"stack {stack.name}'s processes to exit")
        assert leftover_containers(stack.data) == [], f"containers survived stack {stack.name}"


def leftover_containers(data: Path) -> list[str]:
    """Containers of this stack's executor (its node id ends with the stack id)."""
    import hashlib

    stack_id = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    cmd = ["podman", "ps", "-a", "--format", "{{.Names}} {{.Labels}}"]
    if os.geteuid() == 0:
        uid = int(subprocess.run(["id", "-u", "vigil"], capture_output=True, text=True,
                                 check=True).stdout)
        runtime = f"/run/user/{uid}" if Path(f"/run/user/{uid}").is_dir() else \
            f"/tmp/vigil-runtime-{uid}"
        cmd = ["runuser", "-u", "vigil", "--", "env", "HOME=/home/vigil",
               f"XDG_RUNTIME_DIR={runtime}", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if f"-{stack_id}" in line]
