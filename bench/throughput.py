"""Throughput and latency of Vigil against the raw pieces it is built from.

Run from the repository root; the container scenario needs root (it runs Podman as the
unprivileged user ``vigil``, as ``vigil up`` does); ``--no-containers`` skips it:

    .venv/bin/python bench/throughput.py [--quick] [--tasks N] [--containers M]

What is measured
----------------
1. **Platform overhead** (no containers). The executor uses the ``null`` runtime, which runs
   nothing and reports exit 0, so what remains is Vigil's own work per task: the scheduler
   admits the submission (KV create, ``accepted``, KV compare-and-set, work item,
   ``scheduled``, ack), the executor claims it (KV get + CAS), emits ``started``, records
   the outcome (CAS), emits ``finished`` and acks the work item. That is compared with the
   least a JetStream work queue can do for one task: one durable publish, one delivery to a
   pull consumer, one ack.

   * throughput: N task specs published pipelined to ``vigil.submit.bench``; the clock
     stops when N ``finished`` events have been seen (a core subscription made before the
     first publish). Baseline: N messages published pipelined to a work-queue stream and
     consumed and acked through a pull consumer; the clock stops after the last ack has
     reached the server.
   * latency: one task at a time, submit -> ``finished`` event. Baseline: one message at a
     time, publish (PubAck) -> delivered to the pull consumer -> ack confirmed by the server.

   The ``finished`` event is seen on core NATS when the server routes it, which can be a
   little before it is stored; so if anything, the Vigil numbers are slightly flattered.

   Both run in each of NATS's two durability classes, because an fsync per write can
   dominate the cost of a durable queue: nats-server's default (acknowledged writes reach
   the disk within its two-minute sync interval, or when the OS flushes them) and
   ``sync_interval: always`` (every acknowledged write is fsynced first; what ``vigil up``
   runs).

2. **Containers.** The real executor runtime (rootless Podman through its API service) runs
   M containers of ``true`` with C slots. Baseline: the same image run M times by the
   Podman CLI as the same unprivileged user, C at a time (``podman run --rm --runtime runc
   --network none``).

Why the baselines are fair
--------------------------
Each baseline runs on the same machine, in the same run, interleaved with its Vigil
measurement repetition by repetition (so background load hits both alike), and, for the
NATS scenarios, against the very same nats-server process Vigil uses, in the same
durability class, with the same payload, the same ``Nats-Msg-Id`` header, the same
publishing technique (``publish_async`` pipelining) and the same pull-consumer code Vigil's
services use (:class:`vigil.consume.PullConsumer`, a thin layer over core NATS pull
requests). The container baseline uses the same image, OCI runtime (runc), user and
concurrency. Every ratio is ``vigil / baseline``: for throughput, >= 1.0 means Vigil is no
slower; for latency, it is how many raw round trips one Vigil task costs.

Each measurement is repeated R times; the table shows the median and [min-max]. Results are
also written as JSON to ``bench/results/throughput-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from common import ROOT, T0, BenchError, environment, run_main, say, table, write_json
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from vigil import subjects
from vigil.consume import PullConsumer
from vigil.embedded import Stack, StackConfig

TENANT = "bench"
IMAGE = "localhost/vigil-agent:latest"
PODMAN_USER = "vigil"
SPEC = json.dumps({"command": ["true"]}).encode()
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw"
DURABILITY = {"default": False, "always": True}  # class name -> sync_always


# Parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    tasks: int
    latency_samples: int
    containers: int
    concurrency: int
    repeats: int
    slots: int
    warmup: int
    durability: tuple[str, ...]
    skip_containers: bool


def parse_args(argv: Sequence[str] | None = None) -> Params:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small run: N=500, 50 samples, M=8, R=1")
    p.add_argument("--tasks", type=int, help="N tasks per throughput run (default 2000)")
    p.add_argument("--latency-samples", type=int, help="sequential tasks per latency run (200)")
    p.add_argument("--containers", type=int, help="M containers per container run (default 20)")
    p.add_argument("--concurrency", type=int, default=2, help="C: executor slots and raw "
                   "podman runs at once (default 2)")
    p.add_argument("--repeats", type=int, help="R repetitions of each measurement (default 3)")
    p.add_argument("--slots", type=int, default=64, help="executor slots, no-op runs (64)")
    p.add_argument("--durability", choices=[*DURABILITY, "both"], default="both")
    p.add_argument("--no-containers", action="store_true", help="skip the Podman scenario")
    a = p.parse_args(argv)
    quick = bool(a.quick)

    def pick(given: int | None, quick_default: int, full_default: int) -> int:
        if given is not None:
            return given
        return quick_default if quick else full_default

    params = Params(
        tasks=pick(a.tasks, 500, 2000),
        latency_samples=pick(a.latency_samples, 50, 200),
        containers=pick(a.containers, 8, 20),
        concurrency=a.concurrency,
        repeats=pick(a.repeats, 1, 3),
        slots=a.slots,
        warmup=50 if quick else 100,
        durability=tuple(DURABILITY) if a.durability == "both" else (a.durability,),
        skip_containers=bool(a.no_containers),
    )
    if min(params.tasks, params.latency_samples, params.containers, params.concurrency,
           params.repeats, params.slots) < 1:
        p.error("every count must be at least 1")
    return params


# Results ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: R values for Vigil and R for its baseline."""

    scenario: str
    durability: str
    metric: str
    unit: str
    vigil: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.vigil or not self.baseline or statistics.median(self.baseline) == 0:
            return None
        return statistics.median(self.vigil) / statistics.median(self.baseline)

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, float] | None:
            if not xs:
                return None
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

        return {**asdict(self), "vigil_summary": stats(self.vigil),
                "baseline_summary": stats(self.baseline), "ratio": self.ratio}


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def row(self, scenario: str, durability: str, metric: str, unit: str) -> Row:
        for r in self.rows:
            if (r.scenario, r.durability, r.metric) == (scenario, durability, metric):
                return r
        r = Row(scenario, durability, metric, unit)
        self.rows.append(r)
        return r


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    digits = 0 if med >= 100 else 1 if med >= 10 else 2 if med >= 1 else 3
    text = f"{med:.{digits}f}"
    if len(xs) > 1:
        text += f" [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"
    return text


def render_table(results: Results) -> str:
    lines = [("scenario", "durability", "metric", "vigil", "baseline", "ratio")]
    for r in results.rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append((r.scenario, r.durability, f"{r.metric} ({r.unit})", fmt(r.vigil),
                      fmt(r.baseline), ratio))
    return table(lines)


# Ports and temp dirs -------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, avoid: Iterable[int] = (), host: str = "127.0.0.1") -> int:
    """A base port such that base .. base+count-1 are all free (the stack's HTTP ports)."""
    taken = set(avoid)
    for _ in range(100):
        base = free_port(host)
        if base + count > 65_535 or taken & set(range(base, base + count)):
            continue
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    s = held.enter_context(socket.socket())
                    s.bind((host, port))
            return base
        except OSError:
            continue
    raise BenchError(f"found no block of {count} free ports")


# The stack -----------------------------------------------------------------------------------
def stack_say(text: str) -> None:
    say(text.strip())


@contextlib.asynccontextmanager
async def running_stack(runtime: str, slots: int, sync_always: bool) -> AsyncIterator[Stack]:
    """A whole Vigil stack in a temp dir; stopped and removed however the block exits."""
    data = Path(tempfile.mkdtemp(prefix="vigil-bench-"))
    nats_port = free_port()
    config = StackConfig(
        data_dir=data, nats_port=nats_port, http_port=free_port_block(4, avoid=[nats_port]),
        runtime=runtime, slots=slots, podman_user=PODMAN_USER,
        sync_always=sync_always,
        extra_env={"VIGIL_UNSAFE_RUNTIME": "1"} if runtime != "podman" else {},
    )
    stack = Stack(config, say=stack_say)
    try:
        await stack.start()
        check_durability(stack, sync_always)
        yield stack
    finally:
        say(f"stopping the stack in {data}")
        await stack.stop()
        shutil.rmtree(data, ignore_errors=True)


def check_durability(stack: Stack, sync_always: bool) -> None:
    """Guard against measuring the wrong durability class."""
    assert stack.nats is not None
    text = stack.nats.config_file.read_text(encoding="utf-8")
    if ("sync_interval: always" in text) != sync_always:
        raise BenchError(f"nats-server config does not match sync_always={sync_always}:\n{text}")


# Publishing and watching ---------------------------------------------------------------------
def honour_cancellation() -> None:
    """Re-raise a Ctrl-C/SIGTERM that nats-py swallowed.

    ``nats.aio.client.Client._flush_pending`` (under every publish) catches
    ``asyncio.CancelledError`` and carries on, so a cancellation that lands there is lost
    while the task stays marked as cancelling. Called between steps, this turns that mark
    back into the exception, so an interrupt stops the run within one step.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def publish_pipelined(js: JetStreamContext, subject: str, ids: Sequence[str],
                            payload: bytes) -> None:
    """Publish one message per id without waiting in between; return when all are stored."""
    futures = [await js.publish_async(subject, payload, headers={subjects.MSG_ID: i})
               for i in ids]
    honour_cancellation()
    acks = await asyncio.gather(*futures)
    duplicates = sum(1 for a in acks if a.duplicate)
    if duplicates:
        raise BenchError(f"{duplicates} publishes were deduplicated: ids are not unique")


async def publish_one(js: JetStreamContext, subject: str, msg_id: str, payload: bytes) -> None:
    ack = await js.publish(subject, payload, timeout=30, headers={subjects.MSG_ID: msg_id})
    honour_cancellation()
    if ack.duplicate:
        raise BenchError(f"publish of {msg_id} was deduplicated")


class FinishedWatcher:
    """Resolves a future per task id when that task's final ``finished`` event appears."""

    def __init__(self) -> None:
        self._want: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NATS) -> None:
        self._sub = await nc.subscribe(subjects.events_of_kind("finished"), cb=self._on_msg,
                                       pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._want[task_id] = fut
        return fut

    def forget(self, ids: Iterable[str]) -> None:
        for i in ids:
            self._want.pop(i, None)

    async def _on_msg(self, msg: Msg) -> None:
        task_id = subjects.token(msg.subject, 3)  # vigil.events.<tenant>.<task>.finished
        fut = self._want.get(task_id or "")
        if fut is None or fut.done():
            return
        data = msgspec.json.decode(msg.data)
        if data.get("final", True):
            del self._want[task_id or ""]
            fut.set_result(data)


def check_succeeded(events: Iterable[dict[str, Any]], what: str) -> None:
    bad = [e for e in events if e.get("status") != "succeeded"]
    if bad:
        raise BenchError(f"{len(bad)} {what} did not succeed, e.g. {bad[0]}")


# Raw JetStream baseline ----------------------------------------------------------------------
class RawQueue:
    """A work-queue stream on the stack's own nats-server, with one consumer per run.

    A fresh durable per run, deleted afterwards, so that no pull request left outstanding
    by one run can swallow a message of the next.
    """

    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc, self.js = nc, js
        self._runs = 0

    async def create(self) -> None:
        await self.js.add_stream(StreamConfig(
            name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}.>"], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, num_replicas=1, duplicate_window=120.0,
        ))

    async def check_drained(self, durable: str, timeout_s: float = 10.0) -> None:
        """The run counts only if the server ends up holding nothing unacked for it.

        Not timed: the server applies acks asynchronously (a consumer's ack queue), just as
        Vigil's executor acks its work item after the ``finished`` event the clock stops on.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            info = await self.js.consumer_info(RAW_STREAM, durable)
            if not info.num_pending and not info.num_ack_pending:
                return
            if loop.time() > deadline:
                raise BenchError(f"raw consumer {durable}: {info.num_pending} pending, "
                                 f"{info.num_ack_pending} unacked {timeout_s:.0f}s after the run")
            await asyncio.sleep(0.02)  # poll interval of a condition wait, not a sync point

    @contextlib.asynccontextmanager
    async def consumer(self, capacity: int) -> AsyncIterator[tuple[str, PullConsumer]]:
        self._runs += 1
        name = f"raw{self._runs}"
        subject = f"{RAW_SUBJECT}.{name}"
        await self.js.add_consumer(RAW_STREAM, ConsumerConfig(
            durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0, max_ack_pending=-1, max_waiting=512,
        ))
        pull = PullConsumer(self.nc, RAW_STREAM, name, capacity=capacity, max_batch=capacity)
        await pull.start()
        try:
            yield subject, pull
        finally:
            await pull.stop()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(RAW_STREAM, name)


async def raw_throughput(q: RawQueue, n: int, tag: str, timeout_s: float) -> float:
    """Messages per second through publish -> pull -> ack, N pipelined."""
    ids = [f"{tag}-{i:06d}" for i in range(n)]
    async with q.consumer(capacity=256) as (subject, pull):
        async with asyncio.timeout(timeout_s):
            t0 = time.perf_counter()
            publishing = asyncio.create_task(publish_pipelined(q.js, subject, ids, SPEC))
            try:
                for _ in range(n):
                    msg = await pull.next()
                    await msg.ack()
                    pull.release(1)
                await publishing
            finally:
                publishing.cancel()
            # A PING/PONG after the acks: the server has read every ack we sent.
            await q.nc.flush()
            rate = n / (time.perf_counter() - t0)
        await q.check_drained(pull.durable)
    return rate


async def raw_latency(q: RawQueue, samples: int, tag: str, timeout_s: float) -> list[float]:
    """Round trips in ms: publish (PubAck) -> delivery -> ack confirmed by the server."""
    out: list[float] = []
    async with q.consumer(capacity=1) as (subject, pull):
        for i in range(samples):
            async with asyncio.timeout(timeout_s):
                t0 = time.perf_counter()
                await publish_one(q.js, subject, f"{tag}-{i:06d}", SPEC)
                msg = await pull.next()
                await msg.ack_sync(timeout=timeout_s)
                out.append((time.perf_counter() - t0) * 1000)
            pull.release(1)
    return out


# Vigil ---------------------------------------------------------------------------------------
async def vigil_batch(js: JetStreamContext, watcher: FinishedWatcher, ids: Sequence[str],
                      timeout_s: float) -> tuple[float, list[dict[str, Any]]]:
    """Submit ``ids`` pipelined; seconds until every one has finished, and their events."""
    futures = [watcher.expect(i) for i in ids]
    try:
        async with asyncio.timeout(timeout_s):
            t0 = time.perf_counter()
            await publish_pipelined(js, subjects.submit(TENANT), ids, SPEC)
            events = await asyncio.gather(*futures)
            elapsed = time.perf_counter() - t0
    except TimeoutError:
        left = sum(1 for f in futures if not f.done())
        raise BenchError(f"{left} of {len(ids)} tasks unfinished after {timeout_s:.0f}s") from None
    finally:
        watcher.forget(ids)
    return elapsed, list(events)


async def vigil_throughput(js: JetStreamContext, watcher: FinishedWatcher, n: int, tag: str,
                           timeout_s: float) -> float:
    ids = [f"{tag}-{i:06d}" for i in range(n)]
    elapsed, events = await vigil_batch(js, watcher, ids, timeout_s)
    check_succeeded(events, "tasks")
    return n / elapsed


async def vigil_latency(js: JetStreamContext, watcher: FinishedWatcher, samples: int, tag: str,
                        timeout_s: float) -> list[float]:
    """Submit -> final ``finished`` event, in ms, one task at a time."""
    out: list[float] = []
    for i in range(samples):
        task_id = f"{tag}-{i:06d}"
        fut = watcher.expect(task_id)
        try:
            async with asyncio.timeout(timeout_s):
                t0 = time.perf_counter()
                await publish_one(js, subjects.submit(TENANT), task_id, SPEC)
                event = await fut
                out.append((time.perf_counter() - t0) * 1000)
        finally:
            watcher.forget([task_id])
        check_succeeded([event], "tasks")
    return out


# Scenario 1: platform overhead -----------------------------------------------------------------
def throughput_timeout(n: int) -> float:
    return max(60.0, n / 10)  # far beyond any sane rate: only a stuck run hits it


async def overhead_scenario(p: Params, durability: str, run_id: str, results: Results) -> None:
    sync_always = DURABILITY[durability]
    say(f"== platform overhead, fsync {durability}: starting a stack (null runtime, "
        f"{p.slots} slots)")
    async with running_stack("null", p.slots, sync_always) as stack:
        nc = await nats.connect(stack.nats_url, name="vigil-bench")
        try:
            js = nc.jetstream(timeout=30)
            raw = RawQueue(nc, js)
            await raw.create()
            watcher = FinishedWatcher()
            await watcher.start(nc)
            await overhead_warmup(p, raw, js, watcher, f"{run_id}{durability[0]}w")
            for rep in range(p.repeats):
                await overhead_rep(p, durability, raw, js, watcher,
                                   f"{run_id}{durability[0]}{rep}", rep, results)
            await watcher.stop()
        finally:
            await nc.close()


async def overhead_warmup(p: Params, raw: RawQueue, js: JetStreamContext,
                          watcher: FinishedWatcher, tag: str) -> None:
    """First runs pay for connections, consumer setup and cold caches: keep them out."""
    say(f"warm-up: {p.warmup} raw messages, {p.warmup} tasks")
    await raw_throughput(raw, p.warmup, f"{tag}rt", throughput_timeout(p.warmup))
    await raw_latency(raw, 10, f"{tag}rl", 30)
    await vigil_throughput(js, watcher, p.warmup, f"{tag}vt", throughput_timeout(p.warmup))
    await vigil_latency(js, watcher, 10, f"{tag}vl", 30)


async def overhead_rep(p: Params, durability: str, raw: RawQueue, js: JetStreamContext,
                       watcher: FinishedWatcher, tag: str, rep: int, results: Results) -> None:
    n, k = p.tasks, p.latency_samples
    where = f"fsync {durability}, rep {rep + 1}/{p.repeats}"
    tput = results.row("no-op tasks", durability, "throughput", "tasks/s")
    p50 = results.row("no-op tasks", durability, "latency p50", "ms")
    p99 = results.row("no-op tasks", durability, "latency p99", "ms")

    rate = await raw_throughput(raw, n, f"{tag}rt", throughput_timeout(n))
    tput.baseline.append(rate)
    say(f"{where}: raw JetStream throughput {rate:,.0f} msgs/s ({n} msgs)")
    rate = await vigil_throughput(js, watcher, n, f"{tag}vt", throughput_timeout(n))
    tput.vigil.append(rate)
    say(f"{where}: Vigil throughput {rate:,.0f} tasks/s ({n} tasks)")

    lat = await raw_latency(raw, k, f"{tag}rl", 30)
    p50.baseline.append(percentile(lat, 0.5))
    p99.baseline.append(percentile(lat, 0.99))
    say(f"{where}: raw round trip p50 {p50.baseline[-1]:.2f} ms, p99 {p99.baseline[-1]:.2f} ms")
    lat = await vigil_latency(js, watcher, k, f"{tag}vl", 30)
    p50.vigil.append(percentile(lat, 0.5))
    p99.vigil.append(percentile(lat, 0.99))
    say(f"{where}: Vigil submit->finished p50 {p50.vigil[-1]:.2f} ms, "
        f"p99 {p99.vigil[-1]:.2f} ms")


# Scenario 2: containers -----------------------------------------------------------------------
def podman_argv() -> list[str]:
    uid = pwd.getpwnam(PODMAN_USER).pw_uid
    env = [f"HOME=/home/{PODMAN_USER}", f"USER={PODMAN_USER}", "PATH=/usr/bin:/bin",
           f"XDG_RUNTIME_DIR=/tmp/vigil-runtime-{uid}"]
    podman = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none", IMAGE, "true"]
    return ["runuser", "-u", PODMAN_USER, "--", "env", "-i", *env, *podman]


async def podman_run_once(argv: list[str], timeout_s: float) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await proc.communicate()
    except BaseException:
        # Cancelled (Ctrl-C) or stuck: do not leave a podman behind us.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"podman run exited {proc.returncode}: {err.decode(errors='replace')}")
    return time.perf_counter() - t0


async def in_parallel(count: int, concurrency: int, job: Callable[[], Awaitable[float]]
                      ) -> tuple[float, list[float]]:
    """Run ``job`` ``count`` times, ``concurrency`` at once; wall seconds and each job's result."""
    remaining = count
    each: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            each.append(await job())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return time.perf_counter() - t0, each


async def raw_containers(m: int, c: int) -> tuple[float, list[float]]:
    argv = podman_argv()
    return await in_parallel(m, c, lambda: podman_run_once(argv, 120))


async def vigil_containers(js: JetStreamContext, watcher: FinishedWatcher, m: int, tag: str
                           ) -> tuple[float, list[float]]:
    ids = [f"{tag}-{i:04d}" for i in range(m)]
    elapsed, events = await vigil_batch(js, watcher, ids, max(120.0, 15.0 * m))
    check_succeeded(events, "containers")
    return elapsed, [float(e.get("duration_s") or 0.0) for e in events]


def check_podman_prereqs() -> None:
    if shutil.which("podman") is None:
        raise BenchError("podman is not installed")
    if os.geteuid() != 0:
        raise BenchError("the container scenario runs podman as user "
                         f"{PODMAN_USER!r} via runuser, which needs root; use --no-containers")
    pwd.getpwnam(PODMAN_USER)


async def container_scenario(p: Params, run_id: str, results: Results) -> None:
    c = p.concurrency
    check_podman_prereqs()
    say(f"== containers: starting a stack (rootless Podman, {c} slots, fsync always)")
    async with running_stack("podman", c, sync_always=True) as stack:
        nc = await nats.connect(stack.nats_url, name="vigil-bench")
        try:
            js = nc.jetstream(timeout=30)
            watcher = FinishedWatcher()
            await watcher.start(nc)
            say(f"warm-up: {c} raw podman runs, {c} Vigil container tasks")
            await raw_containers(c, c)
            await vigil_containers(js, watcher, c, f"{run_id}cw")
            for rep in range(p.repeats):
                await container_rep(p, js, watcher, f"{run_id}c{rep}", rep, results)
            await watcher.stop()
        finally:
            await nc.close()


async def container_rep(p: Params, js: JetStreamContext, watcher: FinishedWatcher, tag: str,
                        rep: int, results: Results) -> None:
    m, c = p.containers, p.concurrency
    scenario = f"containers C={c}"
    tput = results.row(scenario, "always", "throughput", "containers/s")
    per = results.row(scenario, "always", "mean time per container", "s")
    diag = results.diagnostics.setdefault("container_wall_s", {"vigil": [], "raw": []})
    where = f"containers, rep {rep + 1}/{p.repeats}"

    elapsed, each = await raw_containers(m, c)
    tput.baseline.append(m / elapsed)
    per.baseline.append(elapsed * c / m)
    diag["raw"].append(statistics.mean(each))
    say(f"{where}: raw podman run {m / elapsed:.2f} containers/s ({m} in {elapsed:.1f}s)")
    elapsed, each = await vigil_containers(js, watcher, m, tag)
    tput.vigil.append(m / elapsed)
    per.vigil.append(elapsed * c / m)
    diag["vigil"].append(statistics.mean(each))
    say(f"{where}: Vigil {m / elapsed:.2f} containers/s ({m} in {elapsed:.1f}s)")


# Main ----------------------------------------------------------------------------------------
def write_results(p: Params, results: Results, started: datetime) -> Path:
    return write_json(f"throughput-{started:%Y%m%dT%H%M%SZ}", {
        "started": started.isoformat(), "seconds": round(time.monotonic() - T0, 1),
        "params": asdict(p), "environment": environment(),
        "rows": [r.summary() for r in results.rows], "diagnostics": results.diagnostics,
    })


async def run(p: Params) -> Results:
    started = datetime.now(UTC)
    # Task ids are global in a stack; a per-run prefix keeps repeated runs apart in logs.
    run_id = f"b{started:%H%M%S}"
    results = Results()
    for durability in p.durability:
        await overhead_scenario(p, durability, run_id, results)
    if not p.skip_containers:
        await container_scenario(p, run_id, results)
    print(render_table(results))
    print(f"\nmedian [min–max] over {p.repeats} run(s); ratio = vigil/baseline: for throughput "
          ">= 1.0 means Vigil is no slower, for latency it is raw round trips per Vigil task; "
          "time per container = C x wall time / M.\n"
          f"N={p.tasks}, latency samples={p.latency_samples}, M={p.containers}, "
          f"C={p.concurrency}, no-op slots={p.slots}.")
    print(f"results: {write_results(p, results, started).relative_to(ROOT)}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = parse_args(argv)
    say(f"parameters: {p}")
    return run_main(lambda: run(p))


if __name__ == "__main__":
    sys.exit(main())
