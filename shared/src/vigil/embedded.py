"""``vigil up``: the whole platform on one machine, as child processes.

    rootless Podman API service  (as the unprivileged Podman user when run as root)
    nats-server                  (JetStream, file storage, sync_interval: always,
                                  one least-privilege user per service)
    vigil-scheduler, vigil-executor, vigil-auditor, vigil-gateway

Children die with us (PR_SET_PDEATHSIG) even if we are killed with SIGKILL; on SIGINT or
SIGTERM they are stopped in order (the gateway first, NATS and Podman last) and any
container left by this stack's executor is removed, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vigil import auth, natsusers, subjects
from vigil.errors import VigilError
from vigil.natsserver import NatsServer, check_version, die_with_parent, find_binary
from vigil.permissions import shipped_users
from vigil.secrets import write_key_file

SERVICES = ("scheduler", "executor", "auditor", "gateway")
# Agents' nice value: they lose every contest for the CPU with Vigil's own processes
# (nice 0), so a busy agent never starves the services. An executor run as root lowers
# each agent itself (VIGIL_AGENT_NICE); one that is not can only have agents inherit it
# from the Podman service (which spawns conmon, runc and the agent), started niced.
AGENT_NICE = 10
DEFAULT_TENANT = "default"  # what `vigil up`'s own token and NATS user act as
START_TIMEOUT_S = 60.0


class StackError(VigilError):
    pass


@dataclass
class StackConfig:
    data_dir: Path
    nats_port: int = 4222
    http_port: int = 8080
    host: str = "127.0.0.1"
    slots: int = 4
    runtime: str = "podman"
    podman_user: str | None = None
    log_level: str = "info"
    sync_always: bool = True  # fsync before every ack; False = nats-server's default
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def stack_id(self) -> str:
        return hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]

    @property
    def node_id(self) -> str:
        host = socket.gethostname().split(".", 1)[0] or "node"
        return f"{host}-{self.stack_id}"

    def service_port(self, name: str) -> int:
        return {"gateway": self.http_port, "scheduler": self.http_port + 1,
                "executor": self.http_port + 2, "auditor": self.http_port + 3}[name]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    user: int | None = None
    group: int | None = None
    cwd: str | None = None
    nice: int = 0  # added to ours: its children inherit it

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        nice = self.nice

        def prepare() -> None:
            die_with_parent()
            if nice:
                os.nice(nice)

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=prepare,
                user=self.user, group=self.group,
                extra_groups=[] if self.user is not None else None,
                cwd=self.cwd, start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self, timeout_s: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def private_dir(path: Path, uid: int, gid: int, *, searchable: bool = False) -> Path:
    """Make ``path`` a directory only ``uid`` can use, or prove it already is one.

    These live in /tmp under predictable names: an existing one that is a symlink, or
    belongs to someone else, or is open to others, is refused rather than chowned
    (which would follow a planted symlink) or trusted (a planted Podman socket).
    ``searchable``: others may hold the search bit (not read nor write): Podman makes
    its runtime directory 0711 itself (measured: on the first attach to a container in a
    user namespace of its own, and on ``podman build``), so that one is not refused.
    """
    allowed = 0o011 if searchable else 0
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != uid
                or st.st_mode & 0o077 & ~allowed):
            raise StackError(
                f"{path} exists but is not a private directory of uid {uid} (owner "
                f"{st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it and retry"
            ) from None
        return path
    # Freshly made by us in a sticky /tmp: nobody can have swapped it for a symlink.
    os.chown(path, uid, gid)
    return path


def podman_runtime_dir(uid: int, gid: int) -> Path:
    """Where rootless Podman of ``uid`` keeps its runtime state: the login session's
    ``/run/user/<uid>``, or without one (no systemd-logind) a private dir in /tmp, as
    scripts/lib.sh picks. Podman opens it to traversal itself (0711), so that is allowed."""
    runtime = Path(f"/run/user/{uid}")
    if runtime.is_dir():
        return runtime
    return private_dir(Path(f"/tmp/vigil-runtime-{uid}"), uid, gid,
                       searchable=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


class Stack:
    def __init__(self, config: StackConfig, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.data = config.data_dir.resolve()
        self.nats: NatsServer | None = None
        self.podman: Child | None = None
        self.podman_service: PodmanService | None = None
        self.podman_socket: Path | None = None
        self.children: dict[str, Child] = {}
        self._users_seen: tuple[int, int] | None = None
        self.token = ""
        self.failed: str | None = None

    @property
    def users_file(self) -> Path:
        """Tenants' NATS users (``vigil nats-user``); watched while the stack runs."""
        return self.data / "nats-users.json"

    def _users_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.users_file.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload_users(self) -> None:
        """Tenant users changed (``vigil nats-user add``): reload nats-server's users."""
        stamp = self._users_stamp()
        if stamp == self._users_seen or self.nats is None:
            return
        self._users_seen = stamp
        try:
            users = shipped_users(self._secrets(), natsusers.load(self.users_file))
        except VigilError as exc:
            self.say(f"  ! {self.users_file}: {exc}; NATS users not reloaded")
            return
        self.nats.users = users
        self.nats.reload()
        self.say(f"  ✓ nats      users reloaded from {self.users_file} ({len(users)} users)")

    @property
    def secrets_key_file(self) -> Path:
        return self.data / "secrets.key"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return self.nats.url_for("admin")

    # start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data, 0o700)
        (self.data / "logs").mkdir(exist_ok=True)
        secrets_ = self._secrets()
        # The key that seals tenants' secrets (vigil.secrets): made once, kept 0600. It is
        # what opens every secret stored in this stack: back it up with the data dir.
        write_key_file(self.secrets_key_file)
        self._check_ports()
        if self.config.runtime == "podman":
            await self._start_podman()
        await self._start_nats(secrets_)
        self._write_tokens()
        for name in SERVICES:
            child = self._service_child(name, secrets_)
            self.children[name] = child
            child.start()
        for name in SERVICES:
            await self._wait_healthy(self.children[name])
            self.say(f"  ✓ {name:<10} http://{self.config.host}:{self.config.service_port(name)}"
                     f"{'' if name == 'gateway' else '/metrics'}")

    def _check_ports(self) -> None:
        c = self.config
        for port, what in [(c.nats_port, "--nats-port")] + [
            (c.service_port(n), "--http-port") for n in SERVICES
        ]:
            with socket.socket() as s:
                try:
                    s.bind((c.host, port))
                except OSError:
                    raise StackError(
                        f"port {port} on {c.host} is in use (another `vigil up`?); choose other "
                        f"ports with {what} (the stack uses --http-port .. --http-port+3)"
                    ) from None

    def _secrets(self) -> dict[str, str]:
        path = self.data / "secrets.json"
        if path.exists():
            data: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = {}
        changed = False
        for name in (*SERVICES, "admin", "operator"):
            if name not in data:
                data[name] = secrets.token_urlsafe(24)
                changed = True
        if changed:
            _write_private(path, json.dumps(data, indent=2))
        return data

    def _write_tokens(self) -> None:
        tokens_file = self.data / "tokens.json"
        client_file = self.data / "client.json"
        client: dict[str, Any] = {}
        if client_file.exists():
            client = json.loads(client_file.read_text(encoding="utf-8"))
        if not tokens_file.exists() or not client.get("token") or not client.get(
                "platform_token"):
            tokens_file.unlink(missing_ok=True)
            client["token"] = auth.add_token(tokens_file, "vigil-up", DEFAULT_TENANT,
                                             "operator")
            # The platform's own operator (cross-tenant: incidents of every tenant).
            client["platform_token"] = auth.add_token(tokens_file, "vigil-up-platform", None,
                                                      "operator", "platform")
        client["url"] = self.gateway_url
        client["nats_url"] = self.nats_url
        assert self.nats is not None
        # The default tenant's own NATS user (see vigil.natsusers): raw clients submit and
        # read its tasks with it, connecting with its inbox prefix.
        tenant = natsusers.ensure(self.users_file, DEFAULT_TENANT)
        client["nats_submit_url"] = self.nats.url_for(tenant.name)
        client["nats_submit_inbox_prefix"] = subjects.tenant_inbox(DEFAULT_TENANT)
        client["nats_operator_url"] = self.nats.url_for("operator")
        _write_private(client_file, json.dumps(client, indent=2))
        self.token = client["token"]

    async def _start_nats(self, secrets_: dict[str, str]) -> None:
        binary = find_binary()
        version = check_version(binary)
        natsusers.ensure(self.users_file, DEFAULT_TENANT)
        self._users_seen = self._users_stamp()
        users = shipped_users(secrets_, natsusers.load(self.users_file))
        self.nats = NatsServer(
            store_dir=self.data / "nats", port=self.config.nats_port, host=self.config.host,
            sync_always=self.config.sync_always, users=users, binary=binary,
        )
        await self.nats.start()
        fsync = "fsync always" if self.config.sync_always else "default fsync"
        self.say(f"  ✓ nats      {self.nats.url}  ({version}, JetStream, {fsync})")

    def _service_child(self, name: str, secrets_: dict[str, str]) -> Child:
        c = self.config
        assert self.nats is not None
        # The caller's VIGIL_* settings (e.g. VIGIL_ACK_WAIT_S) reach every service; the
        # ones the stack must control are set after them.
        env = dict(os.environ)
        env.update(c.extra_env)
        env.update({
            "VIGIL_NATS_URL": self.nats.url_for(name),
            "VIGIL_HTTP_HOST": c.host,
            "VIGIL_HTTP_PORT": str(c.service_port(name)),
            "VIGIL_LOG_FORMAT": "json",
            "VIGIL_LOG_LEVEL": c.log_level,
        })
        if name in ("gateway", "executor") and not (
                env.get("VIGIL_SECRETS_KEY_FILE") or env.get("VIGIL_SECRETS_KEY")):
            env["VIGIL_SECRETS_KEY_FILE"] = str(self.secrets_key_file)
        if name == "gateway":
            env["VIGIL_TOKENS_FILE"] = str(self.data / "tokens.json")
            env["VIGIL_AUTH"] = "tokens"
        if name == "executor":
            env["VIGIL_NODE_ID"] = c.node_id
            env["VIGIL_SLOTS"] = str(c.slots)
            env["VIGIL_RUNTIME"] = c.runtime
            if self.podman_socket is not None:
                env["VIGIL_PODMAN_URL"] = f"unix://{self.podman_socket}"
        module = f"vigil_{name}"
        return Child(name, [sys.executable, "-m", module], env,
                     self.data / "logs" / f"{name}.log")

    async def _wait_healthy(self, child: Child) -> None:
        url = f"http://{self.config.host}:{self.config.service_port(child.name)}/healthz"
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if not child.alive:
                    raise StackError(f"{child.name} exited during start; its log "
                                     f"({child.log_path}) ends:\n{child.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise StackError(f"{child.name} not healthy after {START_TIMEOUT_S:.0f}s; see "
                         f"{child.log_path}:\n{child.tail()}")

    # podman -----------------------------------------------------------------------------------
    async def _start_podman(self) -> None:
        self.podman_service = PodmanService(self.data / "logs" / "podman.log",
                                            user=self.config.podman_user,
                                            sock_dir=None if os.geteuid() == 0
                                            else self.data / "podman",
                                            tag=self.config.stack_id)
        await self.podman_service.start()
        self.podman = self.podman_service.child
        self.podman_socket = self.podman_service.socket
        self.say(f"  ✓ podman    unix://{self.podman_socket}  (rootless, as user "
                 f"{self.podman_service.user_name})")

    async def _remove_leftover_containers(self) -> None:
        if self.podman_socket is None or self.podman is None or not self.podman.alive:
            return
        label = json.dumps({"label": [f"dev.vigil.executor={self.config.node_id}"]})
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.podman_socket)),
                base_url="http://podman",
            ) as http:
                async with http.get("/v4.0.0/libpod/containers/json",
                                    params={"all": "true", "filters": label}) as r:
                    found = await r.json() if r.status == 200 else []
                for c in found or []:
                    async with http.delete(f"/v4.0.0/libpod/containers/{c['Id']}",
                                           params={"force": "true"}):
                        pass

    # supervise & stop ---------------------------------------------------------------------------
    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a crashed service (at most 5 times a minute); return when asked to stop."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if stop.is_set():
                return
            if self.nats is not None and not self.nats.running:
                self.failed = f"nats-server exited; see {self.nats.log_file}"
                return
            self._reload_users()
            if self.podman is not None and not self.podman.alive:
                self.failed = f"the Podman API service exited; see {self.podman.log_path}"
                return
            for child in self.children.values():
                if child.alive:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60]
                code = child.process.returncode if child.process else None
                if len(child.restarts) >= 5:
                    self.failed = (f"{child.name} keeps crashing (exit {code}); its log "
                                   f"({child.log_path}) ends:\n{child.tail()}")
                    return
                self.say(f"  ! {child.name} exited with {code}; restarting")
                child.restarts.append(now)
                child.start()

    async def stop(self) -> None:
        order = ("gateway", "scheduler", "auditor", "executor")
        for name in order:
            child = self.children.get(name)
            if child is not None:
                await child.stop(45.0 if name == "executor" else 15.0)
        await self._remove_leftover_containers()
        if self.nats is not None:
            await self.nats.stop()
        if self.podman_service is not None:
            await self.podman_service.stop()


class PodmanService:
    """``podman system service`` for rootless Podman, as a child process.

    Run as root, it runs as the unprivileged ``user`` (default ``vigil``): containers are
    then rootless (container root = that user's uid). Run as anyone else, it runs as them.
    It runs ``nice`` steps below its parent. By default: none when run as root (its
    executors, root too, lower each agent alone, and container starts keep the services'
    priority), else AGENT_NICE (the only way agents get a lower priority than the services
    then: they inherit it).
    """

    def __init__(self, log_path: Path, *, user: str | None = None,
                 sock_dir: Path | None = None, tag: str = "default",
                 nice: int | None = None) -> None:
        self.log_path = log_path
        self._nice = nice if nice is not None else (0 if os.geteuid() == 0 else AGENT_NICE)
        self._user = user
        self._sock_dir = sock_dir
        self._tag = tag
        self.child: Child | None = None
        self.socket: Path | None = None
        self.user_name = ""
        self._made_dir: Path | None = None

    @property
    def url(self) -> str:
        assert self.socket is not None
        return f"unix://{self.socket}"

    async def start(self, timeout_s: float = 30.0) -> None:
        podman = shutil.which("podman")
        if podman is None:
            raise StackError("podman is not installed; run `./dev setup` (or apt-get install "
                             "podman runc uidmap slirp4netns fuse-overlayfs)")
        user: int | None = None
        group: int | None = None
        if os.geteuid() == 0:
            name = self._user or "vigil"
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                raise StackError(f"user {name!r} for rootless Podman does not exist; run "
                                 "`./dev setup`, or set --podman-user") from None
            user, group, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
            runtime_dir = podman_runtime_dir(user, group)
            sock_dir = private_dir(
                self._sock_dir or Path(f"/tmp/vigil-podman-{user}-{self._tag}"), user, group)
            self.user_name = name
        else:
            home = os.path.expanduser("~")
            me, my_group = os.getuid(), os.getgid()
            runtime_env = os.environ.get("XDG_RUNTIME_DIR")
            runtime_dir = (Path(runtime_env) if runtime_env else
                           private_dir(Path(f"/tmp/vigil-runtime-{me}"), me, my_group,
                                       searchable=True))
            sock_dir = private_dir(
                self._sock_dir or Path(f"/tmp/vigil-podman-{me}-{self._tag}"), me, my_group)
            self.user_name = pwd.getpwuid(os.getuid()).pw_name
        if self._sock_dir is None:
            self._made_dir = sock_dir
        sock = sock_dir / "podman.sock"
        sock.unlink(missing_ok=True)
        env = {
            "HOME": home, "USER": self.user_name, "LOGNAME": self.user_name,
            "XDG_RUNTIME_DIR": str(runtime_dir),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        self.child = Child("podman", [podman, "system", "service", "--time=0", f"unix://{sock}"],
                           env, self.log_path, user=user, group=group, cwd=home,
                           nice=self._nice)
        self.child.start()
        self.socket = sock
        await self._wait(sock, timeout_s)

    async def _wait(self, sock: Path, timeout_s: float) -> None:
        assert self.child is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.child.alive:
                raise StackError(f"podman system service exited; its log ends:\n"
                                 f"{self.child.tail()}")
            if sock.exists():
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with aiohttp.ClientSession(
                        connector=aiohttp.UnixConnector(path=str(sock))
                    ) as http, http.get("http://podman/_ping") as r:
                        if r.status == 200:
                            return
            await asyncio.sleep(0.1)
        raise StackError(f"the Podman API service did not come up within {timeout_s:.0f}s; "
                         f"see {self.log_path}")

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(10.0)
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.unlink(missing_ok=True)
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)
