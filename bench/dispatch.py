"""The scheduler with a deep backlog: admission rate, dispatch rate, and memory.

Run from the repository root (no root needed, no Podman):

    .venv/bin/python bench/dispatch.py                 # N=100,000 queued tasks (~5-10 min)
    .venv/bin/python bench/dispatch.py --tasks 20000   # quick run (~1-2 min)
    .venv/bin/python bench/dispatch.py --sync-always   # nats-server fsyncs before every ack

What is measured
----------------
The claim under test (DESIGN.md, "Performance intent"): *memory bounded with 100,000 queued
tasks*. The fair dispatcher keeps the backlog in the ``VIGIL_QUEUE`` stream and reads only
per-subject depths, so the scheduler's memory should not grow with the backlog.

1. **Backlog.** A real nats-server and a real ``vigil-scheduler`` *process* (its memory is
   read from ``/proc/<pid>/status``: VmRSS, VmHWM) and no executor. N task specs (90 % one
   big tenant, 10 % spread over 9 small ones) are published raw to ``vigil.submit.<tenant>``,
   pipelined, acks awaited in batches. With no executor advertised in ``vigil-executors``
   they can only be queued: the admission rate is read from the ``VIGIL_QUEUE`` message
   count (not from per-task events), and the scheduler's RSS is sampled when the backlog
   reaches 0, 10 %, 25 %, 50 % and 100 % of N. Then the run checks that nothing was
   dispatched: no ``scheduled`` event, an empty ``VIGIL_WORK``, and the whole backlog still
   queued, after the scheduler's executor settle time has passed.
2. **Drain.** Executor processes on the ``null`` runtime (runs nothing, exit 0) start; the
   dispatch rate is read from the ``VIGIL_QUEUE`` count going down, and the completion rate
   from ``finished`` events (a core subscription), both per window of ``--window`` seconds:
   median [min-max] over the windows. RSS is sampled throughout.
3. **Baselines, same run, same nats-server:**
   * raw JetStream: the same pipelined publishing into a plain file-storage stream
     (publish + ack only: what one durable write per task costs here);
   * idle pool: with the executors up and no backlog, M tasks submitted the same way;
     admission rate (the scheduler's ``VIGIL_SUBMIT`` consumer fully acked) and end-to-end
     rate (all ``finished``). Free slots let admissions skip the queue (the direct path);
     the rest queue and are dispatched as slots free up, as in the drain.

Ratios: backlog admission / raw publish; drain dispatch / idle-pool end-to-end;
RSS(N) / RSS(N/10). Every number also goes to ``bench/results/dispatch-<timestamp>.json``.

The machine has 2 CPUs shared by nats-server, the scheduler, the executors and this
program (and by whatever else runs): rates are CPU-bound. The table reports how much CPU
each process used per task and how much of the machine other processes took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
from common import ROOT, T0, BenchError, environment, run_main, say, table, write_json
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from vigil import subjects
from vigil.embedded import Child
from vigil.natsserver import NatsServer, check_version, find_binary
from vigil.permissions import random_passwords, shipped_users

SPEC = json.dumps({"command": ["true"]}).encode()
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw"
BIG_TENANT = "big"
POOL = "default"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# Parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    tasks: int
    tenants: int
    big_share: float
    executors: int
    slots: int
    sync_always: bool
    window_s: float
    idle_tasks: int
    idle_repeats: int
    raw_msgs: int
    batch: int
    log_level: str
    stall_s: float
    drain_max_s: float
    keep: bool


def parse_args(argv: Sequence[str] | None = None) -> Params:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=100_000, help="N tasks in the backlog (100000)")
    p.add_argument("--tenants", type=int, default=10, help="tenants: one big, the rest small "
                   "(10)")
    p.add_argument("--big-share", type=float, default=0.9, help="share of the big tenant (0.9)")
    p.add_argument("--executors", type=int, default=2, help="executor processes (2)")
    p.add_argument("--slots", type=int, default=64, help="slots per executor (64)")
    p.add_argument("--sync-always", action="store_true",
                   help="nats-server `sync_interval: always` (fsync before every ack)")
    p.add_argument("--window", type=float, default=5.0, help="rate window in seconds (5)")
    p.add_argument("--idle-tasks", type=int, help="M tasks per idle-pool run (default N/30, "
                   "at least 500)")
    p.add_argument("--idle-repeats", type=int, default=3, help="idle-pool runs (3)")
    p.add_argument("--raw-msgs", type=int, help="messages per raw publish run (default N/10, "
                   "at least 2000); 3 runs")
    p.add_argument("--batch", type=int, default=1000, help="publishes per batch of awaited "
                   "acks (1000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the services' log level (info, as deployed)")
    p.add_argument("--stall", type=float, default=90.0, help="fail when a phase makes no "
                   "progress for this many seconds (90)")
    p.add_argument("--drain-max-s", type=float, default=240.0,
                   help="stop measuring the drain after this many seconds and purge what is "
                   "still queued (0 = drain everything; default 240)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (store and logs)")
    a = p.parse_args(argv)
    params = Params(
        tasks=a.tasks, tenants=a.tenants, big_share=a.big_share, executors=a.executors,
        slots=a.slots, sync_always=bool(a.sync_always), window_s=a.window,
        idle_tasks=a.idle_tasks if a.idle_tasks is not None else max(500, a.tasks // 30),
        idle_repeats=a.idle_repeats,
        raw_msgs=a.raw_msgs if a.raw_msgs is not None else max(2000, a.tasks // 10),
        batch=a.batch, log_level=a.log_level, stall_s=a.stall, drain_max_s=a.drain_max_s,
        keep=bool(a.keep),
    )
    if min(params.tasks, params.tenants, params.executors, params.slots, params.idle_tasks,
           params.idle_repeats, params.raw_msgs, params.batch) < 1:
        p.error("every count must be at least 1")
    if params.tasks < 100:
        p.error("--tasks must be at least 100 (the RSS curve samples at N/10)")
    if not 0 < params.big_share <= 1 or params.window_s <= 0:
        p.error("--big-share must be in (0, 1] and --window positive")
    return params


# Processes and what /proc says about them -----------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB (0 when it is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0])
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its own threads, not its children)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(x) for x in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK


class Proc(Child):
    """A child process (started, stopped and tailed as ``vigil up`` does) whose log we read
    and whose memory we sample."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    async def wait_for_line(self, word: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first JSON log line whose event is ``word``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise BenchError(f"{self.name} exited during start:\n{self.tail()}")
            for line in self.log_text().splitlines():
                if word in line:
                    with contextlib.suppress(ValueError):
                        doc: dict[str, Any] = json.loads(line)
                        if doc.get("event") == word:
                            return doc
            await asyncio.sleep(0.1)
        raise BenchError(f"{self.name} not started after {timeout_s:.0f}s:\n{self.tail()}")

    def check_alive(self) -> None:
        if not self.alive:
            code = self.process.returncode if self.process else None
            raise BenchError(f"{self.name} exited ({code}); its log ends:\n{self.tail()}")

    async def stop(self, timeout_s: float) -> None:
        # Child.stop kills silently after the timeout; a benchmark wants to know of a hang.
        was_alive = self.alive
        await super().stop(timeout_s)
        if was_alive and self.process is not None and self.process.returncode == -signal.SIGKILL:
            say(f"{self.name} did not stop within {timeout_s:.0f}s of SIGTERM; killed it")


def service_proc(service: str, name: str, work: Path, url: str, p: Params,
                 **settings: Any) -> Proc:
    """Start ``vigil-<service>`` with ``settings`` as its VIGIL_* environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update({"VIGIL_NATS_URL": url, "VIGIL_HTTP_PORT": "0", "VIGIL_LOG_FORMAT": "json",
                "VIGIL_LOG_LEVEL": p.log_level})
    env.update({f"VIGIL_{k.upper()}": str(v) for k, v in settings.items()})
    proc = Proc(name, [sys.executable, "-m", f"vigil_{service}"], env,
                work / "logs" / f"{name}.log")
    proc.start()
    return proc


# Results ------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    metric: str
    unit: str
    values: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.values or not self.baseline or statistics.median(self.baseline) == 0:
            return None
        return statistics.median(self.values) / statistics.median(self.baseline)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, metric: str, unit: str, values: Sequence[float],
            baseline: Sequence[float] = (), baseline_name: str = "", note: str = "") -> Row:
        row = Row(section, metric, unit, list(values), list(baseline), baseline_name, note)
        self.rows.append(row)
        return row


def fmt(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    digits = 0 if abs(med) >= 100 else 1 if abs(med) >= 10 else 2
    text = f"{med:,.{digits}f}"
    if len(xs) > 1:
        text += f" [{min(xs):,.{digits}f}–{max(xs):,.{digits}f}]"
    return text


def render_table(rows: Sequence[Row]) -> str:
    lines = [("phase", "metric", "value", "baseline (same run)", "ratio", "n")]
    for r in rows:
        base = f"{fmt(r.baseline)}  {r.baseline_name}" if r.baseline else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        metric = f"{r.metric} ({r.unit})" if r.unit else r.metric
        value = fmt(r.values) + (f"  {r.note}" if r.note else "")
        lines.append((r.section, metric, value, base, ratio, str(len(r.values))))
    return table(lines)


def window_rates(samples: Sequence[tuple[float, int]], window_s: float, *,
                 falling: bool = False) -> list[float]:
    """Rates over consecutive full windows of ``window_s`` from (time, count) samples."""
    if len(samples) < 2:
        return []
    out: list[float] = []
    start_t, start_n = samples[0]
    for t, n in samples[1:]:
        if t - start_t >= window_s:
            delta = (start_n - n) if falling else (n - start_n)
            out.append(delta / (t - start_t))
            start_t, start_n = t, n
    return out


def crossing_time(samples: Sequence[tuple[float, int]], target: int) -> float | None:
    """The time at which a rising count reached ``target``, interpolated between samples."""
    prev: tuple[float, int] | None = None
    for t, n in samples:
        if n >= target:
            if prev is None or n == prev[1]:
                return t
            return prev[0] + (t - prev[0]) * (target - prev[1]) / (n - prev[1])
        prev = (t, n)
    return None


# Watching the stack --------------------------------------------------------------------------
class _Finished(msgspec.Struct):
    status: str = ""


_finished_decoder = msgspec.json.Decoder(_Finished)


class Events:
    """Counts ``scheduled`` and ``finished`` events seen on core NATS."""

    def __init__(self) -> None:
        self.scheduled = 0
        self.finished = 0
        self.not_succeeded: dict[str, int] = {}
        self.first_scheduled_at: float | None = None

    async def start(self, nc: NATS) -> None:
        await nc.subscribe(subjects.events_of_kind("scheduled"), cb=self._on_scheduled,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.subscribe(subjects.events_of_kind("finished"), cb=self._on_finished,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def _on_scheduled(self, msg: Msg) -> None:
        if self.first_scheduled_at is None:
            self.first_scheduled_at = time.monotonic()
        self.scheduled += 1

    async def _on_finished(self, msg: Msg) -> None:
        self.finished += 1
        with contextlib.suppress(msgspec.DecodeError):
            status = _finished_decoder.decode(msg.data).status
            if status != "succeeded":
                self.not_succeeded[status] = self.not_succeeded.get(status, 0) + 1


async def stream_msgs(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def queue_depths(js: JetStreamContext) -> dict[str, int]:
    """``VIGIL_QUEUE`` depth per tenant (one stream-info call, like the dispatcher's)."""
    info = await js.stream_info(subjects.STREAM_QUEUE, subjects_filter=f"{subjects.QUEUE}.>")
    out: dict[str, int] = {}
    for subject, n in (info.state.subjects or {}).items():
        tenant = subjects.token(subject, 3) or "?"
        out[tenant] = out.get(tenant, 0) + int(n)
    return out


async def submissions_left(js: JetStreamContext) -> int:
    """Submissions the scheduler has not acked yet (pending + delivered-unacked)."""
    info = await js.consumer_info(subjects.STREAM_SUBMIT, subjects.CONSUMER_SCHEDULER)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def scheduler_metrics(port: int) -> dict[str, float]:
    """The scheduler's submission outcomes and dispatch count, from its /metrics."""
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/metrics",
                timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
        for line in text.splitlines():
            m = re.match(r'vigil_scheduler_submissions_total\{outcome="(\w+)"\} (\S+)', line)
            if m:
                out[m.group(1)] = float(m.group(2))
            elif line.startswith("vigil_scheduler_dispatched_total "):
                out["dispatched"] = float(line.split()[1])
    return out


@dataclass
class CpuMark:
    """CPU seconds per process and for the whole machine at one moment."""

    t: float
    procs: dict[str, float]
    machine: float

    @classmethod
    def take(cls, procs: dict[str, int]) -> CpuMark:
        own = {name: proc_cpu_s(pid) for name, pid in procs.items()}
        times = os.times()
        own["bench"] = times.user + times.system
        return cls(time.monotonic(), own, machine_busy_s())


def cpu_between(a: CpuMark, b: CpuMark) -> dict[str, float]:
    """CPU seconds used between two marks, per process, plus everything else on the box."""
    used = {name: b.procs.get(name, 0.0) - a.procs.get(name, 0.0) for name in b.procs}
    # A process started between the marks counts from zero.
    used = {name: v if name in a.procs else b.procs[name] for name, v in used.items()}
    used["other processes"] = max(0.0, (b.machine - a.machine) - sum(used.values()))
    used["wall"] = b.t - a.t
    return used


# The run -------------------------------------------------------------------------------------
def tenant_names(p: Params) -> list[str]:
    return [BIG_TENANT] + [f"small{i}" for i in range(1, p.tenants)]


def task_plan(n: int, p: Params, tag: str) -> list[tuple[str, str]]:
    """(tenant, task id) for n tasks, interleaved: ``big_share`` to the big tenant, the
    rest round-robin over the small ones."""
    names = tenant_names(p)
    small = names[1:]
    out: list[tuple[str, str]] = []
    per_mille = round((1.0 - p.big_share) * 1000)
    k = 0
    for i in range(n):
        if small and ((i + 1) * per_mille) // 1000 != (i * per_mille) // 1000:
            tenant = small[k % len(small)]
            k += 1
        else:
            tenant = BIG_TENANT
        out.append((tenant, f"{tag}{i:06d}"))
    return out


async def publish_batched(js: JetStreamContext, items: Sequence[tuple[str, str]],
                          batch: int, on_progress: Callable[[int], None] | None = None) -> None:
    """Publish each (subject, msg id) pipelined; await the acks a batch at a time."""
    done = 0
    for start in range(0, len(items), batch):
        futures = [await js.publish_async(subject, SPEC, headers={subjects.MSG_ID: msg_id})
                   for subject, msg_id in items[start:start + batch]]
        acks = await asyncio.gather(*futures)
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # nats-py swallows cancellation
            raise asyncio.CancelledError
        if any(a.duplicate for a in acks):
            raise BenchError("a publish was deduplicated: task ids are not unique")
        done += len(acks)
        if on_progress is not None:
            on_progress(done)


class Run:
    def __init__(self, p: Params, work: Path) -> None:
        self.p = p
        self.work = work
        self.results = Results()
        self.nats: NatsServer | None = None
        self.scheduler: Proc | None = None
        self.executors: list[Proc] = []
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.events = Events()
        self.metrics_port = 0
        self.scheduler_started_at = 0.0
        self.run_id = f"d{datetime.now(UTC):%H%M%S}"

    # set-up and tear-down ---------------------------------------------------------------------
    async def start(self) -> None:
        p = self.p
        # As shipped: each service under its own least-privilege user (vigil.permissions).
        self.nats = NatsServer(store_dir=self.work / "nats", port=-1, sync_always=p.sync_always,
                               users=shipped_users(random_passwords()))
        await self.nats.start()
        conf = self.nats.config_file.read_text(encoding="utf-8")
        if ("sync_interval: always" in conf) != p.sync_always:
            raise BenchError(f"nats-server config does not match sync_always={p.sync_always}")
        fsync = "fsync always" if p.sync_always else "default fsync"
        say(f"nats-server at {self.nats.url} ({fsync})")
        # The quota must not reject any of the backlog: the whole of N may be one tenant's.
        self.scheduler = service_proc("scheduler", "scheduler", self.work,
                                      self.nats.url_for("scheduler"), p,
                                      max_queued_per_tenant=2 * p.tasks + 10_000)
        started = await self.scheduler.wait_for_line("scheduler_started")
        self.scheduler_started_at = time.monotonic()
        self.metrics_port = int(started.get("http_port") or 0)
        say(f"vigil-scheduler pid {self.scheduler.pid} ready (metrics :{self.metrics_port})")
        self.nc = await nats.connect(self.nats.url_for("admin"), name="vigil-bench-dispatch",
                                     max_reconnect_attempts=-1)
        self.js = self.nc.jetstream(timeout=30)
        await self.events.start(self.nc)

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for proc in self.executors:
            await proc.stop(30.0)
        if self.scheduler is not None:
            await self.scheduler.stop(20.0)
        if self.nats is not None:
            await self.nats.stop()

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.nats is not None and self.nats.process is not None:
            out["nats-server"] = self.nats.process.pid
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.pid
        for proc in self.executors:
            out[proc.name] = proc.pid
        return out

    def rss_mib(self) -> tuple[float, float]:
        assert self.scheduler is not None
        st = proc_status(self.scheduler.pid)
        return st["VmRSS"] / 1024, st["VmHWM"] / 1024

    def nats_rss_mib(self) -> float:
        assert self.nats is not None and self.nats.process is not None
        return proc_status(self.nats.process.pid)["VmRSS"] / 1024

    def check_alive(self) -> None:
        assert self.scheduler is not None
        self.scheduler.check_alive()
        for proc in self.executors:
            proc.check_alive()

    # baseline: raw JetStream publishes ----------------------------------------------------------
    async def raw_publish(self) -> list[float]:
        assert self.js is not None
        p = self.p
        await self.js.add_stream(StreamConfig(
            name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}.>"], storage=StorageType.FILE,
            duplicate_window=600.0))
        rates: list[float] = []
        try:
            for rep in range(3):
                items = [(f"{RAW_SUBJECT}.{i % p.tenants}", f"raw{rep}-{i:06d}")
                         for i in range(p.raw_msgs)]
                t0 = time.perf_counter()
                await publish_batched(self.js, items, p.batch)
                rates.append(p.raw_msgs / (time.perf_counter() - t0))
                say(f"raw JetStream pipelined publish, run {rep + 1}/3: {rates[-1]:,.0f} msgs/s "
                    f"({p.raw_msgs} msgs)")
        finally:
            with contextlib.suppress(Exception):
                await self.js.delete_stream(RAW_STREAM)
        return rates

    async def raw_take(self, count: int = 300, fill: int = 5000) -> dict[str, float]:
        """Entries/s taken off a queue the way the dispatcher does, one after the other:
        get the subject's next message, then delete it; with nats-py's ``delete_msg``
        (the server's default: a secure erase) and with ``no_erase``. Run while the
        backlog sits in the same server, so the disk and page cache are as the drain
        finds them."""
        assert self.js is not None and self.nc is not None
        stream = f"{RAW_STREAM}_TAKE"
        await self.js.add_stream(StreamConfig(
            name=stream, subjects=[f"{RAW_SUBJECT}.take.>"], storage=StorageType.FILE))
        subject = f"{RAW_SUBJECT}.take.big.5"
        payload = b"x" * 700  # about a work item's size
        out: dict[str, float] = {}
        try:
            futures = [await self.js.publish_async(subject, payload) for _ in range(fill)]
            await asyncio.gather(*futures)
            for mode in ("erase", "no_erase"):
                t0 = time.perf_counter()
                for _ in range(count):
                    msg = await self.js.get_msg(stream, seq=1, subject=subject, next=True)
                    if mode == "erase":
                        await self.js.delete_msg(stream, int(msg.seq or 0))
                    else:
                        reply = await self.nc.request(
                            f"$JS.API.STREAM.MSG.DELETE.{stream}",
                            json.dumps({"seq": msg.seq, "no_erase": True}).encode(), timeout=10)
                        if b'"success":true' not in reply.data:
                            raise BenchError(f"delete failed: {reply.data!r}")
                out[mode] = count / (time.perf_counter() - t0)
            say(f"raw take (get next + delete), one at a time: {out['erase']:,.0f}/s with "
                f"delete_msg (secure erase), {out['no_erase']:,.0f}/s with no_erase")
        finally:
            with contextlib.suppress(Exception):
                await self.js.delete_stream(stream)
        return out

    # phase 1: the backlog ------------------------------------------------------------------------
    async def backlog(self) -> dict[str, Any]:
        assert self.js is not None
        p, n = self.p, self.p.tasks
        if await stream_msgs(self.js, f"KV_{subjects.KV_EXECUTORS}") != 0:
            raise BenchError("vigil-executors is not empty before the backlog phase")
        thresholds = sorted({0, n // 10, n // 4, n // 2, n})
        rss_at: dict[int, tuple[float, float]] = {0: self.rss_mib()}
        nats_at: dict[int, float] = {0: self.nats_rss_mib()}
        plan = task_plan(n, p, f"{self.run_id}q")
        items = [(subjects.submit(t), i) for t, i in plan]
        published = 0

        def progress(done: int) -> None:
            nonlocal published
            published = done

        samples: list[tuple[float, int]] = []
        rss_curve: list[tuple[float, int, float, float]] = []
        cpu0 = CpuMark.take(self.pids())
        t0 = time.monotonic()
        publisher = asyncio.create_task(publish_batched(self.js, items, p.batch, progress))
        last_say = last_change = t0
        depth = 0
        try:
            while True:
                await asyncio.sleep(0.2)
                if publisher.done():
                    publisher.result()  # a publish error ends the run
                self.check_alive()
                now = time.monotonic()
                new_depth = await stream_msgs(self.js, subjects.STREAM_QUEUE)
                if new_depth != depth:
                    last_change = now
                depth = new_depth
                samples.append((now - t0, depth))
                rss, hwm = self.rss_mib()
                rss_curve.append((now - t0, depth, rss, hwm))
                for th in thresholds:
                    if th not in rss_at and depth >= th:
                        rss_at[th] = (rss, hwm)
                        nats_at[th] = self.nats_rss_mib()
                if self.events.finished:
                    raise BenchError(f"{self.events.finished} tasks finished (rejected?) while "
                                     "admitting the backlog; see the scheduler's log")
                if now - last_say >= 5 or depth >= n:
                    rate = depth / (now - t0)
                    say(f"backlog: published {published:,}/{n:,}, queued {depth:,} "
                        f"({rate:,.0f} tasks/s), scheduler RSS {rss:.1f} MiB (peak {hwm:.1f})")
                    last_say = now
                if depth >= n:
                    break
                if now - last_change > p.stall_s:
                    raise BenchError(f"the queue stopped growing at {depth} of {n} for "
                                     f"{p.stall_s:.0f}s; scheduler log ends:\n"
                                     f"{self.scheduler.tail() if self.scheduler else ''}")
        finally:
            if not publisher.done():
                publisher.cancel()
                with contextlib.suppress(BaseException):
                    await publisher
        t_all = crossing_time(samples, n) or samples[-1][0]
        cpu = cpu_between(cpu0, CpuMark.take(self.pids()))
        return {"seconds": t_all, "rate": n / t_all, "samples": samples, "rss_at": rss_at,
                "nats_rss_at": nats_at, "rss_curve": rss_curve, "cpu": cpu,
                "windows": window_rates(samples, p.window_s)}

    async def nothing_dispatched(self) -> dict[str, Any]:
        """With no executor advertised, the scheduler must not release anything."""
        assert self.js is not None
        # Past the scheduler's settle time (6 s: when it decides nobody serves the pool)
        # and at least 3 s (a dozen dispatcher rounds) after the last admission.
        settle_left = self.scheduler_started_at + 7.0 - time.monotonic()
        await asyncio.sleep(max(3.0, settle_left))
        depth = await stream_msgs(self.js, subjects.STREAM_QUEUE)
        work = await stream_msgs(self.js, subjects.STREAM_WORK)
        executors = await stream_msgs(self.js, f"KV_{subjects.KV_EXECUTORS}")
        left = await submissions_left(self.js)
        confessions = await self.js.stream_info(
            subjects.STREAM_ISSUES, subjects_filter=f"{subjects.ISSUES}.>")
        check = {
            "queued": depth, "work_items": work, "scheduled_events": self.events.scheduled,
            "executor_entries": executors, "submissions_unacked": left,
            "confessions": dict(confessions.state.subjects or {}),
        }
        ok = (depth == self.p.tasks and work == 0 and self.events.scheduled == 0
              and executors == 0 and left == 0)
        check["ok"] = ok
        if not ok:
            raise BenchError(f"with no executor advertised, something was dispatched or not "
                             f"queued: {check}")
        rss, hwm = self.rss_mib()
        check["rss_at_rest_mib"], check["hwm_mib"] = rss, hwm
        say(f"no executor: {depth:,} queued, 0 work items, 0 scheduled events (confirmed); "
            f"scheduler RSS at rest {rss:.1f} MiB")
        return check

    # phase 2: the drain ----------------------------------------------------------------------
    async def drain(self) -> dict[str, Any]:
        assert self.js is not None and self.nats is not None
        p, n = self.p, self.p.tasks
        cpu0 = CpuMark.take(self.pids())
        t0 = time.monotonic()
        for k in range(p.executors):
            self.executors.append(service_proc(
                "executor", f"executor-{k}", self.work, self.nats.url_for("executor"), p,
                node_id=f"bench-exec-{k}", slots=p.slots, runtime="null", unsafe_runtime="true",
            ))
        for proc in self.executors:
            await proc.wait_for_line("executor_started")
        ready = time.monotonic() - t0
        say(f"{p.executors} executors × {p.slots} slots (null runtime) ready after {ready:.1f}s")
        depth_samples: list[tuple[float, int]] = []
        done_samples: list[tuple[float, int]] = []
        tenants_left: list[tuple[float, int]] = []
        rss_curve: list[tuple[float, int, float, float]] = []
        last_say = last_change = time.monotonic()
        last = (-1, -1)
        while True:
            await asyncio.sleep(0.5)
            self.check_alive()
            now = time.monotonic()
            by_tenant = await queue_depths(self.js)
            depth = sum(by_tenant.values())
            done = self.events.finished
            depth_samples.append((now - t0, depth))
            done_samples.append((now - t0, done))
            tenants_left.append((now - t0, sum(1 for v in by_tenant.values() if v > 0)))
            rss, hwm = self.rss_mib()
            rss_curve.append((now - t0, depth, rss, hwm))
            if (depth, done) != last:
                last, last_change = (depth, done), now
            if now - last_say >= 5 or done >= n:
                say(f"drain: {depth:,} queued, {done:,}/{n:,} finished, "
                    f"{sum(1 for v in by_tenant.values() if v > 0)} tenants waiting, "
                    f"scheduler RSS {rss:.1f} MiB (peak {hwm:.1f})")
                last_say = now
            if done >= n and depth == 0:
                break
            first = self.events.first_scheduled_at
            if p.drain_max_s and first is not None and now - first >= p.drain_max_s:
                say(f"drain: {p.drain_max_s:.0f}s measured; purging the {depth:,} tasks still "
                    "queued (they stay `queued` in KV: this stack is thrown away)")
                break
            if now - last_change > p.stall_s:
                raise BenchError(f"the drain made no progress for {p.stall_s:.0f}s at "
                                 f"{depth} queued, {done} finished; scheduler log ends:\n"
                                 f"{self.scheduler.tail() if self.scheduler else ''}")
        cpu = cpu_between(cpu0, CpuMark.take(self.pids()))
        left = depth_samples[-1][1]
        if left:
            await self.js.purge_stream(subjects.STREAM_QUEUE)
            await self.work_idle()
        if self.events.not_succeeded:
            raise BenchError(f"tasks did not succeed: {self.events.not_succeeded}")
        first = self.events.first_scheduled_at
        start = (first - t0) if first is not None else ready
        # Windows from the first dispatch until the queue is empty (dispatch rate), and
        # until the last finished (completion rate).
        busy = [(t, d) for t, d in depth_samples if t >= start]
        empty_at = next((t for t, d in depth_samples if d == 0), depth_samples[-1][0])
        dispatch_windows = window_rates([(t, d) for t, d in busy if t <= empty_at],
                                        p.window_s, falling=True)
        finish_windows = window_rates([(t, d) for t, d in done_samples if t >= start],
                                      p.window_s)
        finished = done_samples[-1][1]
        end = crossing_time(done_samples, finished) or done_samples[-1][0]
        # Dispatch rate while several tenants take turns vs the big tenant alone.
        many: list[tuple[int, float]] = []
        one: list[tuple[int, float]] = []
        for (ta, da), (tb, db), (_, k) in zip(busy, busy[1:], tenants_left[-len(busy):],
                                              strict=False):
            if tb > empty_at or tb <= ta:
                continue
            (many if k > 1 else one).append(((da - db), tb - ta))
        def pooled(xs: list[tuple[int, float]]) -> float | None:
            secs = sum(s for _, s in xs)
            return sum(d for d, _ in xs) / secs if secs > 0 else None

        return {
            "executors_ready_s": ready, "first_dispatch_s": start, "queue_empty_s": empty_at,
            "all_finished_s": end, "finished": finished, "left_queued": left,
            "rate": finished / max(1e-9, end - start), "dispatch_windows": dispatch_windows,
            "finish_windows": finish_windows, "many_tenants_rate": pooled(many),
            "one_tenant_rate": pooled(one), "depth_samples": depth_samples,
            "done_samples": done_samples, "rss_curve": rss_curve, "cpu": cpu,
            "rss_max_mib": max(r for _, _, r, _ in rss_curve),
            "rss_end_mib": rss_curve[-1][2], "hwm_end_mib": rss_curve[-1][3],
        }

    async def work_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until no work item is waiting or running (the executors are idle)."""
        assert self.js is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await self.js.consumer_info(subjects.STREAM_WORK,
                                               subjects.consumer_executor(POOL))
            if not info.num_pending and not info.num_ack_pending:
                await asyncio.sleep(1.0)  # the last finished events reach us
                return
            await asyncio.sleep(0.2)
        raise BenchError(f"work items still in flight {timeout_s:.0f}s after the purge")

    # baseline: the idle pool ----------------------------------------------------------------------
    async def idle_pool(self) -> dict[str, Any]:
        assert self.js is not None
        p, m = self.p, self.p.idle_tasks
        adm, e2e, outcomes = [], [], []
        cpu0 = CpuMark.take(self.pids())
        for rep in range(p.idle_repeats):
            await asyncio.sleep(1.0)  # let the executors' free slots be advertised
            before = await scheduler_metrics(self.metrics_port)
            finished0 = self.events.finished
            plan = task_plan(m, p, f"{self.run_id}i{rep}")
            items = [(subjects.submit(t), i) for t, i in plan]
            t0 = time.monotonic()
            publisher = asyncio.create_task(publish_batched(self.js, items, p.batch))
            admitted_at: float | None = None
            last_change, last = t0, -1
            try:
                while True:
                    await asyncio.sleep(0.05)
                    if publisher.done():
                        publisher.result()
                    self.check_alive()
                    now = time.monotonic()
                    if admitted_at is None and publisher.done() \
                            and await submissions_left(self.js) == 0:
                        admitted_at = now
                    done = self.events.finished - finished0
                    if done != last:
                        last, last_change = done, now
                    if done >= m and admitted_at is not None:
                        break
                    if now - last_change > p.stall_s:
                        raise BenchError(f"idle-pool run stalled at {done} of {m} finished")
            finally:
                if not publisher.done():
                    publisher.cancel()
                    with contextlib.suppress(BaseException):
                        await publisher
            after = await scheduler_metrics(self.metrics_port)
            adm.append(m / (admitted_at - t0))
            e2e.append(m / (time.monotonic() - t0))
            split = {k: after.get(k, 0) - before.get(k, 0)
                     for k in ("scheduled", "queued", "dispatched")}
            outcomes.append(split)
            say(f"idle pool, run {rep + 1}/{p.idle_repeats}: admitted {adm[-1]:,.0f} tasks/s, "
                f"finished {e2e[-1]:,.0f} tasks/s ({m} tasks; direct {split['scheduled']:.0f}, "
                f"queued {split['queued']:.0f})")
        if self.events.not_succeeded:
            raise BenchError(f"tasks did not succeed: {self.events.not_succeeded}")
        cpu = cpu_between(cpu0, CpuMark.take(self.pids()))
        return {"admission": adm, "end_to_end": e2e, "outcomes": outcomes, "cpu": cpu,
                "rss_mib": self.rss_mib()}


# Reporting -----------------------------------------------------------------------------------
def cpu_per_task(cpu: dict[str, float], tasks: int) -> str:
    parts = []
    for name in ("scheduler", "nats-server", "bench"):
        if name in cpu:
            parts.append(f"{name} {cpu[name] / tasks * 1000:.2f}")
    execs = sum(v for k, v in cpu.items() if k.startswith("executor-"))
    if execs:
        parts.append(f"executors {execs / tasks * 1000:.2f}")
    return ", ".join(parts)


def other_share(cpu: dict[str, float]) -> float:
    """Share of the machine's cores used by processes outside this benchmark."""
    wall = cpu.get("wall", 0.0)
    return cpu.get("other processes", 0.0) / (wall * (os.cpu_count() or 1)) if wall else 0.0


def report(p: Params, res: Results, raw: list[float], take: dict[str, float],
           bl: dict[str, Any], chk: dict[str, Any], dr: dict[str, Any],
           idle: dict[str, Any]) -> str:
    n = p.tasks
    raw_name = "raw JetStream publish"
    res.add("backlog", f"admission rate, 0 → {n:,} queued", "tasks/s", [bl["rate"]], raw,
            raw_name)
    res.add("backlog", f"admission rate per {p.window_s:g} s window", "tasks/s",
            bl["windows"], idle["admission"], "idle-pool admission")
    rss_at = bl["rss_at"]
    tenth = n // 10
    for th in sorted(rss_at):
        rss, hwm = rss_at[th]
        res.add("backlog", f"scheduler RSS at {th:,} queued", "MiB", [rss],
                note=f"(peak {hwm:.1f}; nats-server {bl['nats_rss_at'][th]:.0f})")
    growth = (rss_at[n][0] - rss_at[tenth][0]) / ((n - tenth) / 10_000)
    res.add("backlog", "RSS growth per 10k queued (N/10 → N)", "MiB", [growth])
    res.add("backlog", f"RSS({n:,}) / RSS({tenth:,})", "", [rss_at[n][0] / rss_at[tenth][0]])
    res.add("backlog", f"scheduler RSS at rest, {n:,} queued", "MiB",
            [chk["rss_at_rest_mib"]], note=f"(peak {chk['hwm_mib']:.1f})")
    res.add("backlog", "no executor: dispatched / work items", "",
            [chk["scheduled_events"]], note=f"/ {chk['work_items']} (queued {chk['queued']:,})")
    idle_e2e = idle["end_to_end"]
    res.add("drain", f"dispatch rate per {p.window_s:g} s window", "tasks/s",
            dr["dispatch_windows"], idle_e2e, "idle-pool end-to-end")
    res.add("drain", f"completion rate per {p.window_s:g} s window", "tasks/s",
            dr["finish_windows"], idle_e2e, "idle-pool end-to-end")
    whole = (f"all {n:,}" if not dr["left_queued"] else
             f"{dr['finished']:,} of {n:,} in {p.drain_max_s:g} s, rest purged")
    res.add("drain", f"drain, {whole} finished: first dispatch → last finished", "tasks/s",
            [dr["rate"]], idle_e2e, "idle-pool end-to-end")
    res.add("drain", "dispatch rate vs one-at-a-time queue take", "tasks/s",
            dr["dispatch_windows"], [take["erase"]], "raw get+delete_msg")
    if dr["many_tenants_rate"] is not None:
        res.add("drain", "dispatch rate while ≥ 2 tenants wait", "tasks/s",
                [dr["many_tenants_rate"]])
    if dr["one_tenant_rate"] is not None:
        res.add("drain", "dispatch rate while 1 tenant waits", "tasks/s",
                [dr["one_tenant_rate"]])
    res.add("drain", "scheduler RSS during drain (max / end)", "MiB", [dr["rss_max_mib"]],
            note=f"/ {dr['rss_end_mib']:.1f} (peak {dr['hwm_end_mib']:.1f})")
    res.add("idle pool", f"admission, {p.idle_tasks:,} tasks, no backlog", "tasks/s",
            idle["admission"], raw, raw_name)
    res.add("idle pool", f"end-to-end, {p.idle_tasks:,} tasks, no backlog", "tasks/s",
            idle_e2e)
    res.add("baseline", f"raw JetStream pipelined publish, {p.raw_msgs:,} msgs", "msgs/s", raw)
    res.add("baseline", "raw take, get next + delete_msg (secure erase)", "entries/s",
            [take["erase"]], [take["no_erase"]], "same, no_erase")
    table = render_table(res.rows)

    cpu_b, cpu_d = bl["cpu"], dr["cpu"]
    unservable = sum(v for k, v in chk["confessions"].items() if k.startswith(
        subjects.issue("scheduler", "")))
    ratio = rss_at[n][0] / rss_at[tenth][0]
    # 10 % over a 9x larger backlog is ~55 bytes per queued task on a ~50 MiB process:
    # allocator noise, not state kept per task.
    bounded = "flat: bounded" if ratio <= 1.10 else "GROWING with the backlog"
    summary = (
        f"Summary: with no executor, {n:,} submissions over {p.tenants} tenants were admitted "
        f"into VIGIL_QUEUE at {bl['rate']:,.0f} tasks/s ({bl['rate'] / statistics.median(raw):.2f}"
        f"× a raw pipelined JetStream publish, {statistics.median(raw):,.0f} msgs/s; "
        f"{statistics.median(idle['admission']):,.0f} tasks/s when admitting into an idle pool) "
        f"and nothing was dispatched until an executor advertised itself. The scheduler's RSS "
        f"went {rss_at[0][0]:.1f} → {rss_at[tenth][0]:.1f} → {rss_at[n][0]:.1f} MiB at 0 / "
        f"{tenth:,} / {n:,} queued: {growth:+.2f} MiB per 10k queued tasks, "
        f"RSS({n:,})/RSS({tenth:,}) = {ratio:.2f} ({bounded}). Draining with "
        f"{p.executors}×{p.slots} null-runtime slots dispatched "
        f"{fmt(dr['dispatch_windows'])} tasks/s per {p.window_s:g} s window ({whole} "
        f"finished at {dr['rate']:,.0f} tasks/s, "
        f"{dr['rate'] / statistics.median(idle_e2e):.2f}× the "
        f"idle-pool end-to-end {statistics.median(idle_e2e):,.0f} tasks/s), with the scheduler "
        f"at ≤ {dr['rss_max_mib']:.1f} MiB. CPU ms per task, admission: "
        f"{cpu_per_task(cpu_b, n)}; drain: {cpu_per_task(cpu_d, max(1, dr['finished']))}. "
        f"The scheduler published {unservable:,} confessions while no executor was up (per-task "
        f"'unservable' warnings). "
        f"Other processes on the "
        f"machine took {other_share(cpu_b):.0%} / {other_share(cpu_d):.0%} of its "
        f"{os.cpu_count()} cores during admission / drain."
    )
    return table + "\n\n" + summary


def write_results(p: Params, started: datetime, doc: dict[str, Any]) -> Path:
    full = {"started": started.isoformat(), "seconds": round(time.monotonic() - T0, 1),
            "params": asdict(p), "environment": environment(podman=False), **doc}
    return write_json(f"dispatch-{started:%Y%m%dT%H%M%SZ}", full, indent=1)


async def run(p: Params) -> None:
    started = datetime.now(UTC)
    check_version(find_binary())
    work = Path(tempfile.mkdtemp(prefix="vigil-bench-dispatch-"))
    bench = Run(p, work)
    say(f"load average at start: {os.getloadavg()}")
    try:
        await bench.start()
        raw = await bench.raw_publish()
        say(f"== backlog: {p.tasks:,} tasks, no executor")
        bl = await bench.backlog()
        chk = await bench.nothing_dispatched()
        take = await bench.raw_take()
        say(f"== drain: {p.executors} executors × {p.slots} slots")
        dr = await bench.drain()
        say(f"== idle pool: {p.idle_repeats} × {p.idle_tasks:,} tasks, no backlog")
        idle = await bench.idle_pool()
        text = report(p, bench.results, raw, take, bl, chk, dr, idle)
        print(text)
        bl_json = {k: v for k, v in bl.items() if k != "samples"}
        bl_json["rss_at"] = {str(k): v for k, v in bl["rss_at"].items()}
        path = write_results(p, started, {
            "rows": [asdict(r) | {"ratio": r.ratio} for r in bench.results.rows],
            "raw_publish": raw, "raw_take": take, "backlog": bl_json, "no_executor_check": chk,
            "drain": dr, "idle_pool": idle,
        })
        print(f"\nresults: {path.relative_to(ROOT)}")
    except BaseException:
        if bench.scheduler is not None:
            say(f"scheduler log ({bench.scheduler.log_path}) ends:\n{bench.scheduler.tail(10)}")
        raise
    finally:
        say("stopping executors, scheduler and nats-server")
        await bench.stop()
        if p.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = parse_args(argv)
    say(f"parameters: {p}")
    return run_main(lambda: run(p))


if __name__ == "__main__":
    sys.exit(main())
