"""The executor's own enforcement of a task's resources where cgroups cannot do it.

Rootless Podman on cgroup v1 accepts memory, pids and CPU limits and ignores them, and
its stats do not work there (docs/PLATFORM.md). So while an agent runs, the watchdog
measures it from the host and stops it (SIGKILL, no grace: it is a runaway) when a limit
is crossed; the attempt ends ``failed`` with the limit's name and the peak measured.

What it reads, and why that way:

- **Processes**: the container's own procfs, through ``/proc/<init pid>/root/proc`` (the
  init's pid from Podman's inspect), held open as a directory fd for the attempt. It
  lists exactly the container's pid namespace (nested ones included, double-forked
  orphans too), costs what the container has rather than what the host runs, and a pid
  reused after the container is gone can never point elsewhere.
- **Memory**: the sum of ``Pss`` from each process's ``smaps_rollup`` (shared pages are
  split among their sharers, so a forked hog is not counted twice); ``statm``'s RSS where
  smaps_rollup cannot be read (an overcount for shared pages, never an undercount).
  tmpfs scratch (``/tmp``) is not in it: it is sized by ``VIGIL_TMPFS_MB``.
- **Processes and threads**: each process's ``num_threads`` (what a pids cgroup counts).
- **Disk**: the workspace volume's directory on the host (Podman's ``Mountpoint``), summed
  ``st_blocks * 512`` (ext4 counts delayed-allocation blocks too, so a ``dd`` is seen
  before writeback), walked by directory fd with ``O_NOFOLLOW`` so an agent's symlink
  never leads the walk (possibly root) elsewhere; hard links counted once.

Permissions: read as root (CI, ``vigil up`` as root), everything above works. As the
rootless Podman user, the container's processes are that user's (container root) or
subordinate uids in a user namespace the user owns: ptrace-read access holds for both,
so procfs works too; a workspace directory an agent made unreadable to its owner
(mode 000) cannot be walked, and is counted as such (``unreadable``), never guessed.

Cadence: every ``interval`` (at most 1 s), sooner as a measure nears its limit (half the
time it would take to reach it at the faster of its measured rate and a worst case,
``RATE_PRIOR``), never more often than ``floor`` nor than keeps the sampling under
``budget`` of a core. Each sample runs in a thread: the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from vigil.messages import LimitName
from vigil_executor.isolation import lower_autogroup
from vigil_executor.runtime import HostView, Limits, Runtime

log = structlog.get_logger("vigil.executor.watchdog")

MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
# How fast a measure may grow, at worst, before its rate has been measured: a dd into the
# page cache wrote ~1.3 GiB/s here, a process touching fresh pages faster. Until a
# sample shows more, the watchdog looks again before that rate could reach the limit.
RATE_PRIOR = {"memory_mb": 2048.0, "disk_mb": 1536.0, "pids": 2000.0}
# A walk of a workspace bigger than this many entries stops there: the sum so far is a
# lower bound (if it is already past the limit, the limit is crossed all the same).
MAX_ENTRIES = 1_000_000

LIMITS: dict[str, LimitName] = {"memory_mb": "memory_limit", "disk_mb": "disk_limit",
                                "pids": "pids_limit"}
Confess = Callable[[str, str, str, str | None], Awaitable[None]]


@dataclass(frozen=True)
class Usage:
    """One sample. A measure the watchdog could not take is None."""

    memory_mb: float | None = None
    pids: int | None = None  # tasks: processes and their threads
    processes: int = 0
    disk_mb: float | None = None
    rss_only: bool = False  # memory from statm's RSS (smaps_rollup unreadable)
    unreadable: int = 0  # workspace directories the walk could not enter
    cost_s: float = 0.0


@dataclass(frozen=True)
class Crossing:
    """A limit the agent crossed: what to stop it for, and say."""

    limit: LimitName
    measure: str  # memory_mb, disk_mb, pids
    value: float  # the limit
    peak: float
    processes: int

    @property
    def error(self) -> str:
        if self.measure == "memory_mb":
            return (f"memory limit {self.value:g} MiB crossed: {self.peak:.0f} MiB in "
                    f"{self.processes} processes")
        if self.measure == "disk_mb":
            return (f"disk limit {self.value:g} MiB crossed: the workspace held "
                    f"{self.peak:.0f} MiB")
        return (f"pids limit {self.value:g} crossed: {self.peak:.0f} processes and threads "
                f"({self.processes} processes)")

    @property
    def hint(self) -> str:
        return (f"the agent was killed by the executor's watchdog; if it needs more, raise "
                f"resources.{self.measure} in the task (up to the tenant's maximum, "
                "resources_max), else look for a runaway (a leak, a fork loop, a file "
                "growing without end); not retried: it would cross it again")


def next_delay(value: float | None, limit: float | None, rate: float, interval: float,
               floor: float) -> float:
    """When to look at a measure again: ``interval``, or sooner when at ``rate`` (per
    second) it would reach ``limit`` before then: half that time, not below ``floor``."""
    if value is None or limit is None or rate <= 0:
        return interval
    eta = (limit - value) / rate
    return max(floor, min(interval, eta / 2))


def crossed(usage: Usage, limits: dict[str, float]) -> Crossing | None:
    """The first limit ``usage`` is over (memory, then disk, then pids), if any."""
    for measure in ("memory_mb", "disk_mb", "pids"):
        value, limit = getattr(usage, measure), limits.get(measure)
        if value is not None and limit is not None and value > limit:
            return Crossing(limit=LIMITS[measure], measure=measure, value=limit,
                            peak=round(float(value), 1), processes=usage.processes)
    return None


# reading ---------------------------------------------------------------------------------
def _read(name: str, dir_fd: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _pss_kb(rollup: bytes) -> int:
    at = rollup.find(b"\nPss:")
    if at < 0:
        raise ValueError("no Pss line")
    return int(rollup[at + 5:rollup.index(b"kB", at)])


def processes(proc_fd: int, autogroup_nice: int = 0) -> tuple[int, int, int, bool]:
    """(memory bytes, processes, tasks, rss_only) of the procfs ``proc_fd`` holds.
    Processes that exit while they are read are skipped. With ``autogroup_nice``, each
    process's session is lowered to it where it is higher (an agent's new session, see
    ``vigil_executor.isolation.autogroup_enabled``)."""
    total = procs = tasks = 0
    rss_only = False
    for entry in os.scandir(proc_fd):
        name = entry.name
        if not name.isdigit():
            continue
        try:
            st = _read(f"{name}/stat", proc_fd)
            # Fields after the command (which may hold spaces and parentheses): the
            # 18th of them is num_threads (field 20 of proc(5)).
            threads = int(st[st.rindex(b")") + 2:].split()[17])
        except (OSError, ValueError, IndexError):
            continue
        procs += 1
        tasks += threads
        if autogroup_nice:
            lower_autogroup(name, autogroup_nice, proc_fd)
        try:
            total += _pss_kb(_read(f"{name}/smaps_rollup", proc_fd)) * 1024
        except (OSError, ValueError):
            try:
                total += int(_read(f"{name}/statm", proc_fd).split()[1]) * PAGE
                rss_only = True
            except (OSError, ValueError, IndexError):
                continue  # gone between the reads
    return total, procs, tasks, rss_only


def tree_bytes(root: str, max_entries: int = MAX_ENTRIES) -> tuple[int, int, int]:
    """(allocated bytes, entries, unreadable directories) under ``root``, not following
    symlinks anywhere, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = entries = unreadable = 0
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    stack = [top]
    try:
        while stack and entries < max_entries:
            fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        entries += 1
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                            key = (st.st_dev, st.st_ino)
                            if key in seen:
                                continue
                            seen.add(key)
                        total += st.st_blocks * 512
                        if stat.S_ISDIR(st.st_mode):
                            try:
                                stack.append(os.open(
                                    entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=fd))
                            except OSError:
                                unreadable += 1
            except OSError:
                unreadable += 1
            finally:
                if fd != top:
                    os.close(fd)
    finally:
        os.close(top)
        for fd in stack:
            if fd != top:
                os.close(fd)
    return total, entries, unreadable


@dataclass
class Target:
    """What the watchdog reads of one container, opened once (see the module doc)."""

    proc_fd: int | None = None
    workspace: str | None = None
    autogroup_nice: int = 0  # each sample lowers the agent's sessions to it (0: not)
    problems: list[str] = field(default_factory=list)
    # A sample runs in a thread that a cancelled watchdog does not stop: the fd is closed
    # by whichever of close() and that sample comes last, never under a read (a closed
    # fd's number may be reused by then for anything).
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _busy: bool = False
    _closing: bool = False

    @classmethod
    def open(cls, view: HostView | None, autogroup_nice: int = 0) -> Target:
        target = cls(autogroup_nice=autogroup_nice)
        if view is None:
            target.problems.append("the runtime does not say where the agent runs")
            return target
        if not view.running:
            return target  # the agent is done already: nothing to watch, nothing wrong
        if view.pid:
            try:
                target.proc_fd = os.open(f"/proc/{view.pid}/root/proc",
                                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                processes(target.proc_fd)  # readable at all?
            except OSError as exc:
                target._close_fd()
                if exc.errno in (errno.ENOENT, errno.ESRCH) and not os.path.exists(
                        f"/proc/{view.pid}"):
                    return target  # it ended between the inspect and this: as above
                target.problems.append(f"cannot read the container's processes "
                                       f"(/proc/{view.pid}/root/proc: {exc.strerror})")
        else:
            target.problems.append("the runtime gave no pid for the container")
        if view.workspace:
            try:
                tree_bytes(view.workspace, 1)
                target.workspace = view.workspace
            except OSError as exc:
                target.problems.append(f"cannot read the workspace volume "
                                       f"({view.workspace}: {exc.strerror})")
        else:
            target.problems.append("the runtime gave no host path for the workspace")
        return target

    def sample(self, with_disk: bool) -> Usage:
        t0 = time.perf_counter()
        memory: float | None = None
        pids: int | None = None
        procs = unreadable = 0
        rss_only = False
        with self._lock:
            if self._closing:
                return Usage()
            self._busy = True
        try:
            if self.proc_fd is not None:
                with contextlib.suppress(OSError):  # the container is gone: nothing to add
                    size, procs, pids, rss_only = processes(self.proc_fd,
                                                            self.autogroup_nice)
                    memory = size / MIB
        finally:
            with self._lock:
                self._busy = False
                if self._closing:
                    self._close_fd()
        disk: float | None = None
        if with_disk and self.workspace is not None:
            with contextlib.suppress(OSError):
                used, _, unreadable = tree_bytes(self.workspace)
                disk = used / MIB
        return Usage(memory_mb=memory, pids=pids, processes=procs, disk_mb=disk,
                     rss_only=rss_only, unreadable=unreadable,
                     cost_s=time.perf_counter() - t0)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._busy:
                self._close_fd()

    def _close_fd(self) -> None:
        if self.proc_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.proc_fd)
            self.proc_fd = None


def enforcement(limits: Limits, *, cgroups: bool, watchable: bool = True,
                disk_watchable: bool = True) -> dict[str, dict[str, Any]]:
    """Each limit's value and who enforces it (``Started.resources``):
    ``cgroup`` (the kernel, where cgroup v2 is delegated), ``watchdog`` (this module),
    ``rlimit`` (only RLIMIT_DATA per process is left), ``none`` (nothing: said so)."""
    memory = "cgroup" if cgroups else "watchdog" if watchable else "rlimit"
    return {
        "memory_mb": {"value": limits.memory_mb, "by": memory},
        "pids": {"value": limits.pids,
                 "by": "cgroup" if cgroups else "watchdog" if watchable else "none"},
        "cpus": {"value": limits.cpus or None,
                 "by": "cgroup" if cgroups and limits.cpus > 0 else "none"},
        "disk_mb": {"value": limits.disk_mb or None,
                    "by": "watchdog" if limits.disk_mb and disk_watchable else "none"},
    }


def node_enforcement(*, cgroups: bool, safe_runtime: bool) -> dict[str, str]:
    """How this node enforces each limit, for its advertisement (``GET /v1/executors``)."""
    if not safe_runtime:
        return dict.fromkeys(("memory_mb", "pids", "cpus", "disk_mb"), "none")
    return {name: entry["by"] for name, entry in enforcement(
        Limits(cpus=1.0, disk_mb=1), cgroups=cgroups).items()}


class Watchdog:
    """Watches one running agent; :meth:`run` returns the first :class:`Crossing`."""

    def __init__(self, limits: Limits, *, cgroups: bool, interval_s: float,
                 floor_s: float = 0.02, budget: float = 0.05, autogroup_nice: int = 0
                 ) -> None:
        self.limits = limits
        # Sessions the agent starts are lowered to this at every sample (0: not asked).
        self.autogroup_nice = autogroup_nice
        self.cgroups = cgroups
        self.interval_s = interval_s
        self.floor_s = floor_s
        self.budget = budget
        self.target = Target()
        self.resources: dict[str, dict[str, Any]] = enforcement(limits, cgroups=cgroups)
        self.samples = 0
        self.peaks: dict[str, float] = {}
        self.last: Usage | None = None

    async def attach(self, runtime: Runtime, cid: str, volume: str) -> list[str]:
        """Find the started container ``cid`` and its workspace ``volume`` on the host;
        what cannot be watched is returned (and is ``none``/``rlimit`` in ``resources``).
        An unsafe runtime enforces nothing (its node says so at start, once)."""
        if runtime.name != "podman":
            self.resources = {n: {**e, "by": "none"} for n, e in self.resources.items()}
            return []
        try:
            view = await runtime.host_view(cid, volume)
        except Exception as exc:  # the runtime's trouble: said as what cannot be watched
            log.warning("host_view_failed", error=str(exc) or type(exc).__name__)
            view = None
        return await self.open(view)

    async def open(self, view: HostView | None) -> list[str]:
        """Find the container's processes and workspace; what cannot be watched, said
        (also in ``resources``, as ``by: none``/``rlimit``)."""
        watched = {n for n, e in self.resources.items() if e["by"] == "watchdog"}
        if not watched and not self.autogroup_nice:
            return []
        self.target = await asyncio.to_thread(Target.open, view, self.autogroup_nice)
        self.resources = enforcement(self.limits, cgroups=self.cgroups,
                                     watchable=self.target.proc_fd is not None,
                                     disk_watchable=self.target.workspace is not None)
        return self.target.problems if self.unwatched() else []

    def unwatched(self) -> list[str]:
        """Limits meant for the watchdog that it cannot watch on this attempt."""
        return [n for n, e in self.resources.items()
                if e["value"] and e["by"] in ("none", "rlimit") and n != "cpus"]

    def _limits(self) -> dict[str, float]:
        return {n: float(e["value"]) for n, e in self.resources.items()
                if e["by"] == "watchdog" and e["value"]}

    async def run(self) -> Crossing:
        """Sample until a limit is crossed (the caller stops the agent and cancels this
        when the agent ends first). Never raises for a failed read: that measure is
        skipped in that sample."""
        limits = self._limits()
        if not limits and not (self.autogroup_nice and self.target.proc_fd is not None):
            await asyncio.Event().wait()  # nothing to watch: wait to be cancelled
        previous: tuple[float, Usage] | None = None
        warned = False
        try:
            while True:
                now = time.monotonic()
                usage = await asyncio.to_thread(self.target.sample, "disk_mb" in limits)
                self.samples += 1
                self.last = usage
                if usage.unreadable and not warned:
                    warned = True  # an undercount, said once (started said what is watched)
                    log.warning("workspace_partly_unreadable", directories=usage.unreadable)
                for name in limits:
                    value = getattr(usage, name)
                    if value is not None:
                        self.peaks[name] = max(self.peaks.get(name, 0.0), float(value))
                if (crossing := crossed(usage, limits)) is not None:
                    log.warning("resource_limit_crossed", limit=crossing.limit,
                                value=crossing.value, peak=crossing.peak,
                                samples=self.samples)
                    return crossing
                delay = self.interval_s
                for name, limit in limits.items():
                    value, rate = getattr(usage, name), RATE_PRIOR[name]
                    if previous is not None and value is not None:
                        then, before = previous
                        old = getattr(before, name)
                        if old is not None and now > then:
                            rate = max(rate, (value - old) / (now - then))
                    delay = min(delay, next_delay(value, limit, rate, self.interval_s,
                                                  self.floor_s))
                # Never more than `budget` of a core on this agent's samples.
                delay = max(delay, min(self.interval_s, usage.cost_s / self.budget))
                previous = (now, usage)
                await asyncio.sleep(max(0.0, delay - (time.monotonic() - now)))
        finally:
            self.close()

    def close(self) -> None:
        self.target.close()
