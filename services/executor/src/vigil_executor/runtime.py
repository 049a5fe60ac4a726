"""The container runtime interface the executor runs agents through.

Podman (:mod:`vigil_executor.podman`) is the default and the only runtime allowed in
production. :mod:`vigil_executor.process` holds two *unsafe* runtimes for measuring the
platform's own overhead; they refuse to start without ``VIGIL_UNSAFE_RUNTIME=1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, Protocol

from vigil.errors import VigilError

Stream = Literal["stdout", "stderr"]

# Labels every Vigil container carries: how a restarted executor finds its orphans.
LABEL_TASK = "dev.vigil.task-id"
LABEL_TENANT = "dev.vigil.tenant"
LABEL_ATTEMPT = "dev.vigil.attempt"
LABEL_EXECUTOR = "dev.vigil.executor"
LABEL_MANAGED = "dev.vigil.managed"


@dataclass(frozen=True)
class Limits:
    """Resource limits. Which of them the host can enforce is the runtime's to say."""

    pids: int = 512
    memory_mb: int = 2048
    cpus: float = 0.0  # 0 = no CPU quota
    nofile: int = 1024
    nproc: int = 4096
    disk_mb: int = 0  # the workspace's size; 0 = none (enforced by the watchdog alone)


@dataclass(frozen=True)
class HostView:
    """Where a running container is, seen from the host: its init's pid and its workspace
    volume's directory (what the executor's watchdog reads; None when unknown)."""

    pid: int | None = None
    workspace: str | None = None
    # False when the container has already stopped (a quick agent): nothing to watch,
    # which is no failure of the watchdog's.
    running: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    workspace_volume: str
    workspace_path: str = "/workspace"
    control_dir: str | None = None  # host dir, read-only inside at CONTROL_PATH
    # The egress relay (a host file), read-only inside at RELAY_PATH; set when the task
    # has egress (the command then starts with it: see vigil_executor.egress).
    relay: str | None = None
    secrets_dir: str | None = None  # host dir (tmpfs), read-only inside at SECRETS_PATH
    # Private writable tmpfs mounts (the root filesystem is read-only), each tmpfs_mb big.
    tmpfs: tuple[str, ...] = ()
    tmpfs_mb: int = 256
    limits: Limits = field(default_factory=Limits)
    timeout_s: float = 3600.0  # the runtime's own backstop; the executor enforces it first
    # The agent's nice value: its first process is lowered to it before the agent's code
    # runs (0: as the runtime starts it). See ExecutorSettings.agent_nice.
    nice: int = 0
    stop_grace_s: float = 10.0


class ArchiveTooLarge(VigilError):
    """An exported workspace passed the size limit the runtime was given; the export
    stopped there rather than copying the rest (``read`` bytes were read)."""

    def __init__(self, read: int, limit: int) -> None:
        super().__init__(f"workspace archive passed {limit} bytes (read {read} bytes, stopped)")
        self.read = read
        self.limit = limit


class ContainerError(VigilError):
    """The runtime refused or failed a container operation, classified once where the
    runtime's error is read (for Podman: ``vigil_executor.podman.classify``).

    ``retryable``: the host's failure, not the task's (no processes or memory left, full or
    broken storage, the runtime's own 5xx): the task is handed back, no attempt spent.
    Otherwise the request itself is wrong (a command the image lacks, an invalid setting
    of the task): retrying cannot help. ``cause`` is a short, bounded name for it
    (``eagain``, ``storage_full``, ``command_not_runnable`` ...), for confessions and
    metrics."""

    def __init__(self, message: str, *, cause: str, retryable: bool) -> None:
        super().__init__(message, retryable=retryable)
        self.cause = cause


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    oom_killed: bool = False
    # Set when the agent never ran: the container's init could not start it (it failed
    # to fork or to exec the command), so the exit code is the init's, not the agent's.
    start_error: ContainerError | None = None


CONTROL_PATH = "/run/vigil"
RELAY_PATH = "/run/vigil-relay"
SECRETS_PATH = "/run/secrets"  # a task's secrets as files, one per env name


@dataclass(frozen=True)
class Leftover:
    """A container found on the runtime that an earlier life of this executor created."""

    id: str
    task_id: str
    attempt: int
    state: str
    tenant: str = ""


class Container(Protocol):
    """A created container. ``output()`` may be iterated from before ``start()``."""

    id: str

    async def start(self) -> int | None:
        """Run the agent. Returns the nice value its first process runs at (the spec's
        ``nice`` if the runtime could lower it), None when the runtime cannot say."""
        ...

    async def import_workspace(self, archive: BinaryIO) -> None:
        """Unpack a tar archive (from ``export_workspace``) into the workspace; before start."""
        ...

    def export_workspace(self) -> AsyncIterator[bytes]:
        """The workspace as a tar archive, in chunks."""
        ...

    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """Output lines (without the newline) as they are written, until the agent exits."""
        ...

    async def wait(self) -> ExitInfo: ...

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        ...

    async def remove(self) -> None: ...


class Runtime(Protocol):
    name: str

    @property
    def limits_enforced(self) -> bool:
        """False when the host cannot enforce memory/CPU/pids limits (cgroup v1 rootless)."""
        ...

    @property
    def limits_note(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def image_exists(self, image: str) -> bool: ...

    async def image_id(self, image: str) -> str | None:
        """The id of the image ``image`` names here (sha256 hex), None if there is none."""
        ...

    async def load_image(self, archive: BinaryIO) -> list[str]:
        """Load an image archive (what ``podman save`` writes); the names it loaded."""
        ...

    async def remove_image(self, image: str) -> None:
        """Remove the image ``image`` names (best effort)."""
        ...

    async def images(self) -> list[str] | None:
        """The image names this node holds, for its advertisement; ``[ANY_IMAGE]`` when
        the runtime needs none, None when it cannot tell (see ExecutorInfo.images)."""
        ...

    async def create(self, spec: ContainerSpec) -> Container:
        """Create the container and attach to its output; ``start()`` runs it."""
        ...

    async def remove_volume(self, name: str) -> None: ...

    async def host_view(self, cid: str, volume: str) -> HostView | None:
        """Where container ``cid`` and its workspace volume are on the host, for the
        watchdog; None when this runtime cannot say."""
        ...

    async def find_containers(self, node_id: str) -> list[Leftover]: ...

    async def find_volumes(self, node_id: str) -> list[str]:
        """Workspace volumes this node's executor created, by label, with or without a
        container (an executor killed between removing the one and the other)."""
        ...

    async def remove_container(self, cid: str) -> None: ...


class TruncatedLine(bytes):
    """A line cut at the length limit; ``size`` is how long it really was (in bytes)."""

    size: int
    limit: int  # the length it was cut at

    def __new__(cls, head: bytes, size: int) -> TruncatedLine:
        line = super().__new__(cls, head + b" [truncated: %d bytes]" % size)
        line.size = size
        line.limit = len(head)
        return line


class LineSplitter:
    """Turn a stream of chunks into lines, truncating any line longer than ``max_len``.

    A longer line keeps its first ``max_len`` bytes and comes out when its newline does
    (or at ``flush``) as a :class:`TruncatedLine` that knows its full size; its rest is
    counted and dropped, so memory stays bounded however long the line."""

    def __init__(self, max_len: int) -> None:
        self._buf = bytearray()
        self._max = max_len
        self._head: bytes | None = None  # the kept start of an over-long line in progress
        self._seen = 0  # bytes of that line already dropped from the buffer

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        out: list[bytes] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(self._buf[start:nl])
            start = nl + 1
            if self._head is not None:
                out.append(TruncatedLine(self._head, self._seen + len(line)))
                self._head, self._seen = None, 0
            elif len(line) > self._max:
                out.append(TruncatedLine(line[: self._max], len(line)))
            else:
                out.append(line)
        del self._buf[:start]
        if len(self._buf) > self._max or (self._head is not None and self._buf):
            if self._head is None:
                self._head = bytes(self._buf[: self._max])
            self._seen += len(self._buf)
            self._buf.clear()
        return out

    def flush(self) -> list[bytes]:
        line, head, seen = bytes(self._buf), self._head, self._seen
        self._buf.clear()
        self._head, self._seen = None, 0
        if head is not None:
            return [TruncatedLine(head, seen + len(line))]
        return [line] if line else []
