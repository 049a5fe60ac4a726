"""Soak test: Vigil keeps every task through random executor kills (kill -9 and SIGTERM).

Run from the repository root, as root (rootless Podman runs as the unprivileged user
``vigil``, as ``vigil up`` does), with the agent image ``localhost/vigil-agent:latest``:

    .venv/bin/python bench/soak.py [--tasks N] [--minutes M] [--executors 3] [--quick]

The set-up is real: its own nats-server (JetStream, ``sync_interval: always``, temp store),
its own rootless Podman API service, the scheduler in this process, and ``--executors``
``vigil-executor`` *processes* (``soak-0`` .. ``soak-<n-1>``, lease 6 s, heartbeat 1 s,
agent stop grace 2 s). N tasks are published to ``vigil.submit.soak`` (``Nats-Msg-Id`` =
task id): mostly the checkpointing counter agent (``tests/agents/counter.py``, 4-10 steps,
a checkpoint per step, ~2-6 s) and some plain short commands, ``max_attempts`` 10.

While they run, a chaos loop picks a random live executor every 1.5-4 s and kills it with
SIGKILL or SIGTERM (50/50), never leaving fewer than one executor up; each victim is
restarted under the same node id (so it also removes its orphaned containers) 1-4 s after
its kill, once its process has exited. Chaos ends when every task is terminal (or after
``--minutes``); the whole run is bounded by ``--timeout-min``.

What is measured
----------------
* **Outcomes, from the durable stores only** (never from live messages): each task's final
  state in KV ``vigil-tasks`` and its events in streams ``VIGIL_EVENTS`` and
  ``VIGIL_OUTPUT`` (an ordered consumer over ``vigil.events.<id>.>`` each, deliver all):

  - succeeded / failed / timed out / dead, by final status;
  - **lost**: no state, or a state that is not terminal when the run ends;
  - **duplicated**: finished events of more than one attempt, or a finished event whose
    attempt is not the state's attempt;
  - **resumed from checkpoint**: a later attempt whose ``started`` event says
    ``resumed=true`` *and* whose agent printed ``start at N`` with N > 0 in that attempt
    (its own output proves it carried on, not started over);
  - **checkpoint regressions**: an attempt that started below a step an earlier attempt
    had durably checkpointed (a ``checkpoint`` event with ok and ``note.n``): lost progress.
    A checkpoint the task rolled back from (``rolled_back_from`` in its history: the agent
    kept crashing right after restoring it) is left out: that loss was confessed;
  - **checkpoint rollbacks** (from the tasks' histories) and **drain snapshots**: kept
    clean (the agent exited 0 on SIGTERM), kept unclean (no checkpoint of the agent's to
    protect), or skipped (``checkpoint_skipped`` in the executors' logs: the agent was
    killed and its own checkpoint is kept). The counter agent has no SIGTERM handler and
    writes its state file non-atomically on purpose: a drain may catch it mid-write;
  - **wrong output**: a succeeded counter task whose last attempt did not print
    ``done at <STEPS>``;
  - **unannounced restores**: an attempt whose ``started`` event (and so ``VIGIL_RESUMED``)
    says not resumed, yet whose agent found a count in its workspace (``start at N>0``).

* **Failover time** per task running on a killed executor. Right after the signal, the
  tasks' KV states say which tasks were ``running`` with ``executor`` = that node (and at
  which attempt). The failover time of each is the time from the signal to the task's
  next ``started`` event (a higher attempt, on any executor, the restarted one included),
  timestamped on arrival by a core subscription to ``vigil.events.*.started`` (or, if
  that missed it, from the stored event's own time). kill -9 waits for the lease (ack wait
  after the last heartbeat); SIGTERM is a drain: grace, snapshot, hand back, restart. Both
  include waiting for a free slot, since the pool is kept saturated.

* **Orphan overlap** (kill -9): a killed node's container keeps running until the node's
  next life removes it (``orphan_removed`` in its log). When the lease lapses first, the
  next attempt starts while the orphan still runs: two copies of the agent at once, for
  the time between the new attempt's ``started`` event and that removal.

* **Evidence of trouble**: executor and scheduler logs are scanned for crashes
  (``attempt_crashed``, ``executor_bug``, ``attempt_failed_unexpectedly``, ``Traceback``,
  error-level lines); confessions in ``VIGIL_ISSUES`` are counted by category; SIGTERM
  drains slower than the grace + 10 s, and containers still there after every executor
  drained at the end, are counted. ``--diagnose`` logs the asyncio task stacks of an
  executor whose drain is slow (SIGUSR2 to a bootstrap around ``vigil_executor``).

The report goes to stdout, progress to stderr, everything (every kill, every failover,
every anomalous task) to ``bench/results/soak-<timestamp>.json``, and the services' logs to
``bench/results/soak-<timestamp>-logs/``. Exit status: 0 clean; 1 a task was lost or
duplicated (or the run timed out with tasks stuck); 3 fewer kills than the minimum happened
while tasks ran (the soak proves nothing); 130 interrupted. Everything started is stopped
and removed however the run ends (containers of ``soak-*`` executors included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import nats
import nats.errors
from common import RESULTS_DIR, ROOT, T0, BenchError, environment, run_main, table, write_json
from common import say as bench_say
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from vigil import logs, subjects, topology
from vigil.embedded import PodmanService
from vigil.jetstream import TaskStore
from vigil.messages import TaskState
from vigil.natsserver import NatsServer, die_with_parent
from vigil.permissions import random_passwords, shipped_users
from vigil_executor.runtime import LABEL_EXECUTOR, LABEL_MANAGED
from vigil_scheduler.service import Scheduler
from vigil_scheduler.settings import SchedulerSettings

AGENT_SOURCE = (ROOT / "tests" / "agents" / "counter.py").read_text(encoding="utf-8")
TENANT = "soak"
NODE_PREFIX = "soak-"
VOLUME_PREFIX = f"vigil-ws-{NODE_PREFIX}"
PODMAN_API = "/v4.0.0/libpod"

# Executor settings: a short lease so that a kill -9 fails over in seconds.
ACK_WAIT_S = 6
HEARTBEAT_S = 1
STOP_GRACE_S = 2
MAX_ATTEMPTS = 10
TASK_TIMEOUT_S = 600

# The workload: counter agents of 4-10 steps (a checkpoint each) and some plain commands.
STEPS = (4, 10)
STEP_S = 0.3
PLAIN_SHARE = 0.15
PLAIN_COMMANDS = (["true"], ["sh", "-c", "echo plain task; sleep 1"])

# Chaos: deliberate random pauses (the only sleeps in this program that are not bounded
# waits for a condition).
GAP_S = (1.5, 4.0)  # between two kills
PAUSE_S = (1.0, 4.0)  # from a kill to the restart of the same node

READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 90.0  # SIGTERM drain: the executor itself waits at most grace + 60 s
SLOW_DRAIN_S = STOP_GRACE_S + 10.0  # grace, snapshot, hand back: anything beyond is a hang
STOP_TIMEOUT_S = 30.0
RESTART_TRIES = 3
POLL_S = 0.1  # how often a bounded wait re-checks its condition
SWEEP_S = 10.0  # full KV sweep for terminal tasks, besides the finished-event hints
PROGRESS_S = 10.0
EVENT_READ_IDLE_S = 5.0
VERIFY_CONCURRENCY = 8

LOG_PATTERNS = ("attempt_crashed", "executor_bug", "attempt_failed_unexpectedly",
                "handler_crashed", "Traceback", '"level":"error"', '"level":"critical"',
                "Violation")  # nats-server: a service reached beyond its permissions
START_RE = re.compile(r"^start at (\d+) resumed=(\d) attempt=(\d+)$")
# Wider than the benchmarks' clock: a soak can run for hours.
say = functools.partial(bench_say, width=7)


# Parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    tasks: int
    minutes: float | None
    executors: int
    slots: int
    min_kills: int
    timeout_min: float
    seed: int
    quick: bool
    asyncio_debug: bool
    diagnose: bool


def parse_args(argv: Sequence[str] | None = None) -> Params:
    p = argparse.ArgumentParser(description="Vigil soak test: tasks through random "
                                "executor kills (kill -9 and SIGTERM); see the module docstring.")
    p.add_argument("--tasks", type=int, help="tasks to submit (default 200; --quick 40)")
    p.add_argument("--minutes", type=float, help="stop the chaos after M minutes (default: "
                   "when every task is terminal)")
    p.add_argument("--executors", type=int, default=3, help="executor processes (default 3)")
    p.add_argument("--slots", type=int, default=2, help="slots per executor (default 2)")
    p.add_argument("--min-kills", type=int, help="kills required while tasks run (default 20; "
                   "--quick 6)")
    p.add_argument("--timeout-min", type=float, default=20.0, help="bound on the whole run "
                   "from the first submission (default 20)")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    p.add_argument("--quick", action="store_true", help="40 tasks, at least 6 kills")
    p.add_argument("--asyncio-debug", action="store_true", help="run executors with "
                   "PYTHONASYNCIODEBUG=1 (slower; logs where a leaked future was created)")
    p.add_argument("--diagnose", action="store_true", help="start executors through a "
                   "bootstrap that logs every asyncio task's stack on SIGUSR2, sent when a "
                   "SIGTERM drain is slow")
    a = p.parse_args(argv)
    params = Params(
        tasks=a.tasks if a.tasks is not None else 40 if a.quick else 200,
        minutes=a.minutes, executors=a.executors, slots=a.slots,
        min_kills=a.min_kills if a.min_kills is not None else 6 if a.quick else 20,
        timeout_min=a.timeout_min,
        seed=a.seed if a.seed is not None else int(time.time()),
        quick=bool(a.quick), asyncio_debug=bool(a.asyncio_debug), diagnose=bool(a.diagnose),
    )
    if params.tasks < 1 or params.slots < 1 or params.timeout_min <= 0:
        p.error("--tasks, --slots and --timeout-min must be positive")
    if params.executors < 2:
        p.error("--executors must be at least 2: one is always kept alive")
    return params


# The workload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTask:
    id: str
    kind: str  # "counter" or "plain"
    steps: int  # counter steps; 0 for a plain task
    spec: dict[str, Any]


def plan_tasks(n: int, run_tag: str, rng: random.Random) -> list[PlannedTask]:
    plan = []
    for i in range(n):
        task_id = f"{run_tag}-{i:04d}"
        common = {"max_attempts": MAX_ATTEMPTS, "timeout_s": TASK_TIMEOUT_S,
                  "labels": {"soak": run_tag}}
        if rng.random() < PLAIN_SHARE:
            command = list(rng.choice(PLAIN_COMMANDS))
            plan.append(PlannedTask(task_id, "plain", 0, {"command": command, **common}))
            continue
        steps = rng.randint(*STEPS)
        spec = {"command": ["python3", "-c", AGENT_SOURCE],
                "env": {"STEPS": str(steps), "STEP_S": str(STEP_S)}, **common}
        plan.append(PlannedTask(task_id, "counter", steps, spec))
    return plan


async def submit(js: JetStreamContext, plan: Sequence[PlannedTask]) -> None:
    """Publish every spec; the task id comes from ``Nats-Msg-Id`` (the id rule)."""
    for t in plan:
        ack = await js.publish(subjects.submit(TENANT), json.dumps(t.spec).encode(),
                               timeout=10, headers={subjects.MSG_ID: t.id})
        if ack.duplicate:
            raise BenchError(f"submission of {t.id} was deduplicated: ids are not unique")


# Executor processes ---------------------------------------------------------------------------
# `python -m vigil_executor`, plus a SIGUSR2 handler that logs where each asyncio task waits.
DIAGNOSE_BOOTSTRAP = '''
import asyncio, io, json, runpy, signal, sys

def dump(signum, frame):
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for task in asyncio.all_tasks(loop):
        buf = io.StringIO()
        task.print_stack(file=buf)
        print(json.dumps({"event": "soak_task_dump", "task": repr(task)[:400],
                          "stack": buf.getvalue()[-1500:]}), file=sys.stderr, flush=True)

signal.signal(signal.SIGUSR2, dump)
runpy.run_module("vigil_executor", run_name="__main__", alter_sys=True)
'''


def executor_argv(p: Params) -> list[str]:
    if p.diagnose:
        return [sys.executable, "-c", DIAGNOSE_BOOTSTRAP]
    return [sys.executable, "-m", "vigil_executor"]


def _open_append(path: Path) -> IO[bytes]:
    return open(path, "ab")  # handed to the child process; closed after the spawn


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class ExecutorProc:
    """One ``vigil-executor`` process under a fixed node id, restartable after a kill."""

    def __init__(self, node_id: str, log_path: Path, env: dict[str, str],
                 argv: list[str]) -> None:
        self.node_id = node_id
        self.log_path = log_path
        self.env = env
        self.argv = argv
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False  # started and pulling work
        self.busy = False  # in a kill/restart cycle
        self.starts = 0
        self._offset = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self._offset = _size(self.log_path)
        log = _open_append(self.log_path)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        self.starts += 1
        self.ready = False

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until this life logs ``executor_started`` (orphans removed, pulling work)."""
        deadline = time.monotonic() + timeout_s
        while "executor_started" not in _read_from(self.log_path, self._offset):
            if not self.alive:
                raise BenchError(f"executor {self.node_id} exited during start; see "
                                f"{self.log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"executor {self.node_id} not ready after {timeout_s:.0f}s")
            await asyncio.sleep(POLL_S)
        self.ready = True

    def send(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> bool:
        if self.process is None:
            return True
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM (drain), SIGKILL after ``timeout_s``; True if it exited on its own."""
        self.ready = False
        if not self.alive:
            return True
        self.send(signal.SIGTERM)
        if await self.wait_exit(timeout_s):
            return True
        self.send(signal.SIGKILL)
        await self.wait_exit(10)
        return False


def executor_env(nats_url: str, podman_url: str, node_id: str, p: Params,
                 state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    if p.asyncio_debug:
        env["PYTHONASYNCIODEBUG"] = "1"
    env.update({
        "VIGIL_NATS_URL": nats_url, "VIGIL_NODE_ID": node_id, "VIGIL_RUNTIME": "podman",
        "VIGIL_PODMAN_URL": podman_url, "VIGIL_ACK_WAIT_S": str(ACK_WAIT_S),
        "VIGIL_HEARTBEAT_S": str(HEARTBEAT_S), "VIGIL_STOP_GRACE_S": str(STOP_GRACE_S),
        "VIGIL_SLOTS": str(p.slots), "VIGIL_LOG_FORMAT": "json", "VIGIL_HTTP_PORT": "0",
        "VIGIL_STATE_DIR": str(state_dir),
    })
    return env


# Live observation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StartSeen:
    task_id: str
    attempt: int
    executor: str
    resumed: bool
    at: float  # time.monotonic() on arrival


class LiveEvents:
    """``started`` events timestamped on arrival; ``finished`` events as hints to look."""

    def __init__(self) -> None:
        self.starts: dict[str, list[StartSeen]] = defaultdict(list)
        self.finished_hints: set[str] = set()
        self.wake = asyncio.Event()

    async def subscribe(self, nc: NATS) -> None:
        await nc.subscribe(subjects.events_of_kind("started"), cb=self._on_started,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.subscribe(subjects.events_of_kind("finished"), cb=self._on_finished,
                           pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def _on_started(self, msg: Msg) -> None:
        at = time.monotonic()
        e = json.loads(msg.data)
        self.starts[e["task_id"]].append(StartSeen(e["task_id"], int(e.get("attempt", 0)),
                                                   str(e.get("executor")),
                                                   bool(e.get("resumed")), at))

    async def _on_finished(self, msg: Msg) -> None:
        task_id = subjects.token(msg.subject, 3)  # vigil.events.<tenant>.<task>.finished
        if task_id:
            self.finished_hints.add(task_id)
            self.wake.set()

    def next_start(self, task_id: str, after_attempt: int) -> StartSeen | None:
        later = [s for s in self.starts.get(task_id, []) if s.attempt > after_attempt]
        return min(later, key=lambda s: (s.attempt, s.at)) if later else None


class Progress:
    """Which tasks are terminal, read from KV (woken by finished events, swept regularly)."""

    def __init__(self, store: TaskStore, ids: Iterable[str], live: LiveEvents) -> None:
        self.store = store
        self.pending: set[str] = set(ids)
        self.total = len(self.pending)
        self.live = live

    async def check(self, ids: Iterable[str]) -> None:
        todo = [i for i in ids if i in self.pending]
        states = await asyncio.gather(*(self.store.get(TENANT, i) for i in todo))
        for task_id, got in zip(todo, states, strict=True):
            if got is not None and got[0].terminal:
                self.pending.discard(task_id)

    async def wait_all(self, deadline: float, chaos: Chaos) -> bool:
        """True once every task is terminal; False at the deadline."""
        last_sweep = last_note = time.monotonic()
        await self.check(list(self.pending))
        while self.pending:
            now = time.monotonic()
            if now > deadline:
                return False
            if now - last_note >= PROGRESS_S:
                last_note = now
                say(f"{self.total - len(self.pending)}/{self.total} terminal; {chaos.summary()}")
            self.live.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.live.wake.wait(), min(SWEEP_S, deadline - now))
            hints, self.live.finished_hints = self.live.finished_hints, set()
            if time.monotonic() - last_sweep >= SWEEP_S:
                hints |= self.pending
                last_sweep = time.monotonic()
            await self.check(hints)
        return True


async def running_on(store: TaskStore, ids: Iterable[str], node: str) -> list[tuple[str, int]]:
    """(task id, attempt) of every task whose KV state is running on ``node``."""
    todo = list(ids)
    states = await asyncio.gather(*(store.get(TENANT, i) for i in todo))
    out = []
    for got in states:
        if got is not None and got[0].status == "running" and got[0].executor == node:
            out.append((got[0].id, got[0].attempt))
    return sorted(out)


# Chaos ------------------------------------------------------------------------------------------
@dataclass
class KillRecord:
    n: int
    node: str
    signal: str  # SIGKILL or SIGTERM
    at: float  # time.monotonic() just before the signal
    wall: float  # time.time() just before the signal
    running: list[tuple[str, int]]  # (task id, attempt) running on the node at the kill
    # ... whose attempt an earlier kill of this node had already orphaned (the lease has not
    # lapsed yet, so KV still names the node): not counted twice.
    already_orphaned: list[tuple[str, int]] = field(default_factory=list)
    exit_s: float | None = None  # signal -> process gone
    restart_s: float | None = None  # signal -> restarted
    ready_s: float | None = None  # signal -> pulling work again
    errors: list[str] = field(default_factory=list)


class Chaos:
    """Kill a random live executor every GAP_S, restart it PAUSE_S after its kill."""

    def __init__(self, executors: list[ExecutorProc], store: TaskStore, progress: Progress,
                 rng: random.Random, diagnose: bool = False) -> None:
        self.executors = executors
        self.diagnose = diagnose
        self.store = store
        self.progress = progress
        self.rng = rng
        self.kills: list[KillRecord] = []
        self.stop = asyncio.Event()
        self._hit: set[tuple[str, int]] = set()  # attempts already orphaned by a kill
        self._restarts: set[asyncio.Task[None]] = set()

    def summary(self) -> str:
        by = Counter(k.signal for k in self.kills)
        up = sum(1 for e in self.executors if e.ready)
        return (f"kills {len(self.kills)} (kill -9 {by['SIGKILL']}, SIGTERM {by['SIGTERM']}); "
                f"executors up {up}/{len(self.executors)}")

    async def run(self, until: float | None) -> None:
        try:
            while not self.stop.is_set() and (until is None or time.monotonic() < until):
                if await _pause(self.stop, self.rng.uniform(*GAP_S)):
                    break
                victim = self._pick()
                if victim is not None:
                    await self._kill(victim, self.rng.choice([signal.SIGKILL, signal.SIGTERM]))
            await self.settle()
        finally:
            for task in list(self._restarts):
                task.cancel()

    def _pick(self) -> ExecutorProc | None:
        """A ready executor, provided another one stays up after its kill."""
        ready = [e for e in self.executors if e.ready and not e.busy]
        return self.rng.choice(ready) if len(ready) >= 2 else None

    async def _kill(self, victim: ExecutorProc, sig: signal.Signals) -> None:
        victim.busy, victim.ready = True, False
        at, wall = time.monotonic(), time.time()
        victim.send(sig)
        found = await running_on(self.store, self.progress.pending, victim.node_id)
        running = [r for r in found if r not in self._hit]
        self._hit.update(running)
        record = KillRecord(len(self.kills) + 1, victim.node_id, sig.name, at, wall, running,
                            [r for r in found if r not in running])
        self.kills.append(record)
        say(f"kill #{record.n}: {sig.name} {victim.node_id} running {len(running)} task(s)"
            + (f" (+{len(record.already_orphaned)} orphaned before)"
               if record.already_orphaned else ""))
        task = asyncio.create_task(self._restart(victim, record))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, victim: ExecutorProc, record: KillRecord) -> None:
        try:
            if self.diagnose and not await victim.wait_exit(SLOW_DRAIN_S):
                record.errors.append(f"slow drain: task stacks dumped to {victim.log_path.name}")
                victim.send(signal.SIGUSR2)
            if not await victim.wait_exit(EXIT_TIMEOUT_S):
                record.errors.append(f"{record.signal}: still running after "
                                     f"{EXIT_TIMEOUT_S:.0f}s; killed -9")
                victim.send(signal.SIGKILL)
                await victim.wait_exit(10)
            record.exit_s = time.monotonic() - record.at
            pause = self.rng.uniform(*PAUSE_S) - (time.monotonic() - record.at)
            if pause > 0:
                await asyncio.sleep(pause)  # deliberate: the node stays down a while
            await self._start_again(victim, record)
        finally:
            victim.busy = False

    async def _start_again(self, victim: ExecutorProc, record: KillRecord) -> None:
        for _ in range(RESTART_TRIES):
            await victim.start()
            record.restart_s = record.restart_s or time.monotonic() - record.at
            try:
                await victim.wait_ready()
            except BenchError as exc:
                record.errors.append(str(exc))
                say(f"kill #{record.n}: restart failed: {exc}")
                await victim.stop(10)
                continue
            record.ready_s = time.monotonic() - record.at
            return

    async def settle(self, timeout_s: float = EXIT_TIMEOUT_S + READY_TIMEOUT_S) -> None:
        """Wait for restarts in progress (bounded); cancel what is left."""
        if self._restarts:
            await asyncio.wait(set(self._restarts), timeout=timeout_s)
        for task in list(self._restarts):
            task.cancel()


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """A deliberate random pause that ends early (True) when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# Reading the durable stores ---------------------------------------------------------------------
async def read_stored(js: JetStreamContext, subject: str, stream: str,
                      idle_s: float = EVENT_READ_IDLE_S) -> list[dict[str, Any]]:
    """Every message on ``subject`` stored in ``stream``, from the first (ordered consumer)."""
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_s)
            except nats.errors.TimeoutError:
                break  # only when nothing (more) is stored: num_pending said 0 otherwise
            out.append(json.loads(msg.data))
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def read_tasks(js: JetStreamContext, store: TaskStore, ids: Sequence[str]
                     ) -> dict[str, tuple[TaskState | None, list[dict[str, Any]]]]:
    """Final state (KV) and stored events (stream) of every task."""
    gate = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def one(task_id: str) -> tuple[TaskState | None, list[dict[str, Any]]]:
        async with gate:
            got = await store.get(TENANT, task_id)
            events = [e for stream in (subjects.STREAM_EVENTS, subjects.STREAM_OUTPUT)
                      for e in await read_stored(js, subjects.task_events(TENANT, task_id),
                                                 stream)]
            # Lifecycle and output are two streams (ADR 16): one timeline, by time.
            events.sort(key=lambda e: str(e.get("time", "")))
            return (got[0] if got else None), events

    results = await asyncio.gather(*(one(i) for i in ids))
    return dict(zip(ids, results, strict=True))


# Verdicts ---------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What the durable stores say about one task."""

    task_id: str
    kind: str
    status: str | None
    attempt: int
    finished_attempts: list[int]
    lost: bool
    duplicated: bool
    no_finished_event: bool
    status_mismatch: bool
    resumed_from_checkpoint: bool
    regressions: list[str]
    wrong_output: bool
    lost_attempts: int
    handed_back: int
    rollbacks: int  # checkpoints the task rolled back from (confessed)
    drains_clean: int  # drain snapshots kept, clean / unclean
    drains_unclean: int
    starts: dict[int, int]  # attempt -> N of the agent's "start at N"
    resumed_flags: dict[int, bool]  # attempt -> its started event's ``resumed``
    resumed_flag_mismatch: list[int]  # attempts that found a restored workspace unannounced


def lines_by_attempt(events: Iterable[dict[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for e in sorted((e for e in events if e.get("kind") == "log"),
                    key=lambda e: (e.get("attempt", 0), e.get("stream", ""), e.get("first", 0))):
        if e.get("stream") == "stdout":
            out[int(e.get("attempt", 0))].extend(e.get("lines", []))
    return out


def start_points(lines: dict[int, list[str]]) -> dict[int, int]:
    """Attempt -> the N of the agent's ``start at N`` line in that attempt."""
    out = {}
    for attempt, text in lines.items():
        for line in text:
            if (m := START_RE.match(line)) is not None:
                out[attempt] = int(m.group(1))
                break
    return out


def checkpoint_regressions(events: Sequence[dict[str, Any]], starts: dict[int, int],
                           rolled_back: frozenset[str] = frozenset()) -> list[str]:
    """Attempts that started below a step an earlier attempt had durably checkpointed (in
    a checkpoint the task did not roll back from)."""
    saved = [(int(e.get("attempt", 0)), int(e["note"]["n"])) for e in events
             if e.get("kind") == "checkpoint" and e.get("ok", True)
             and e.get("name") not in rolled_back
             and isinstance(e.get("note"), dict) and "n" in e["note"]]
    out = []
    for attempt, n in sorted(starts.items()):
        before = max((s for a, s in saved if a < attempt), default=0)
        if n < before:
            out.append(f"attempt {attempt} started at {n}; attempt(s) before it had "
                       f"checkpointed step {before}")
    return out


def judge(t: PlannedTask, state: TaskState | None, events: list[dict[str, Any]]) -> Verdict:
    finished = [e for e in events if e.get("kind") == "finished"]
    attempts = [int(e.get("attempt", 0)) for e in finished]
    started = {int(e.get("attempt", 0)): e for e in events if e.get("kind") == "started"}
    lines = lines_by_attempt(events)
    starts = start_points(lines)
    terminal = state is not None and state.terminal
    resumed = any(a > 1 and started.get(a, {}).get("resumed") is True and n > 0
                  for a, n in starts.items())
    wrong = (t.kind == "counter" and state is not None and state.status == "succeeded"
             and f"done at {t.steps}" not in lines.get(state.attempt, []))
    history = state.history if state is not None else []
    rolled_back = frozenset(h.rolled_back_from for h in history if h.rolled_back_from)
    drains = [bool(e.get("clean")) for e in events
              if e.get("kind") == "checkpoint" and e.get("reason") == "drain" and e.get("ok")]
    flags = {a: bool(e.get("resumed")) for a, e in started.items()}
    return Verdict(
        task_id=t.id, kind=t.kind, status=state.status if state else None,
        attempt=state.attempt if state else 0, finished_attempts=attempts,
        lost=not terminal,
        duplicated=len(set(attempts)) > 1 or (state is not None
                                              and any(a != state.attempt for a in attempts)),
        no_finished_event=terminal and not finished,
        status_mismatch=state is not None and any(e.get("status") != state.status
                                                  for e in finished),
        resumed_from_checkpoint=resumed,
        regressions=(checkpoint_regressions(events, starts, rolled_back)
                     if t.kind == "counter" else []),
        wrong_output=wrong,
        lost_attempts=sum(1 for h in history if h.outcome == "lost"),
        handed_back=sum(1 for h in history if h.outcome == "handed_back"),
        rollbacks=len(rolled_back),
        drains_clean=sum(drains), drains_unclean=len(drains) - sum(drains),
        starts=starts, resumed_flags=flags,
        # VIGIL_RESUMED=0 promises an empty workspace; "start at N>0" means it was not.
        resumed_flag_mismatch=[a for a, n in starts.items() if n > 0 and flags.get(a) is False],
    )


# Failover ---------------------------------------------------------------------------------------
@dataclass
class Failover:
    kill: int
    signal: str
    task_id: str
    attempt: int  # the attempt running at the kill
    outcome: str  # restarted | finished_on_node | no_restart
    seconds: float | None = None
    next_executor: str | None = None
    same_node: bool | None = None
    source: str | None = None  # live (core subscription) or stored (the event's own time)
    # kill -9: how long the killed node's container of this attempt still ran after the next
    # attempt had started (its restart removes it); 0 when it was gone first.
    orphan_overlap_s: float | None = None


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def orphan_removals(paths: Iterable[Path]) -> dict[tuple[str, int], tuple[float, str]]:
    """(task id, attempt) -> (when, container state) of each ``orphan_removed`` log line."""
    out = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"orphan_removed"' in line:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        e = json.loads(line)
                        out[(str(e["task_id"]), int(e["attempt"]))] = (epoch(e["timestamp"]),
                                                                      str(e.get("state")))
    return out


def orphan_overlap(removal: tuple[float, str] | None, next_start: dict[str, Any] | None
                   ) -> float | None:
    """Seconds two copies of the agent ran at once (same clock: this host's)."""
    if removal is None or next_start is None:
        return None
    when, state = removal
    if state != "running":
        return 0.0
    return max(0.0, when - epoch(str(next_start["time"])))


def stored_next_start(events: Sequence[dict[str, Any]], after: int) -> dict[str, Any] | None:
    later = [e for e in events if e.get("kind") == "started" and int(e.get("attempt", 0)) > after]
    return min(later, key=lambda e: int(e.get("attempt", 0))) if later else None


def failovers(kills: Sequence[KillRecord], live: LiveEvents,
              stored: dict[str, tuple[TaskState | None, list[dict[str, Any]]]],
              removals: dict[tuple[str, int], tuple[float, str]]) -> list[Failover]:
    out = []
    for k in kills:
        for task_id, attempt in k.running:
            f = Failover(k.n, k.signal, task_id, attempt, "restarted")
            state, events = stored.get(task_id, (None, []))
            nxt = stored_next_start(events, attempt)
            if k.signal == "SIGKILL":
                f.orphan_overlap_s = orphan_overlap(removals.get((task_id, attempt)), nxt)
            if (seen := live.next_start(task_id, attempt)) is not None:
                f.seconds, f.next_executor, f.source = seen.at - k.at, seen.executor, "live"
            elif nxt is not None:
                f.seconds = epoch(str(nxt["time"])) - k.wall
                f.next_executor, f.source = nxt.get("executor"), "stored"
            elif state is not None and state.terminal and state.attempt == attempt:
                f.outcome = "finished_on_node"
            else:
                f.outcome = "no_restart"
            if f.next_executor is not None:
                f.same_node = f.next_executor == k.node
            out.append(f)
    return out


def stats(xs: Sequence[float]) -> dict[str, float | int] | None:
    if not xs:
        return None
    s = sorted(xs)
    return {"n": len(s), "p50": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
            "max": s[-1], "min": s[0]}


# Evidence in logs and confessions ----------------------------------------------------------------
def scan_logs(paths: Iterable[Path]) -> dict[str, Any]:
    """Lines matching LOG_PATTERNS per pattern: a count and the first few (file:line)."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                for pattern in LOG_PATTERNS:
                    if pattern in line:
                        counts[pattern] += 1
                        if len(examples[pattern]) < 5:
                            examples[pattern].append(f"{path.name}:{number}: {line.strip()[:600]}")
    return {"counts": dict(counts), "examples": dict(examples)}


def skipped_drain_snapshots(paths: Iterable[Path]) -> int:
    """Drain snapshots not taken (the agent was killed; its own checkpoint is kept)."""
    n = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"checkpoint_skipped"' in line:
                    with contextlib.suppress(ValueError):
                        if json.loads(line).get("reason") == "drain":
                            n += 1
    return n


def summarize_confessions(issues: Iterable[dict[str, Any]]) -> dict[str, Any]:
    by: Counter[str] = Counter()
    serious: list[dict[str, Any]] = []
    for c in issues:
        by[f"{c.get('source')}/{c.get('severity')}/{c.get('category')}"] += 1
        if c.get("severity") in ("error", "critical") and len(serious) < 20:
            serious.append({k: c.get(k) for k in ("severity", "category", "summary", "task_id",
                                                  "attempt", "node")})
    return {"by_source_severity_category": dict(sorted(by.items())), "serious": serious}


# Report -----------------------------------------------------------------------------------------
def fmt_stats(s: dict[str, float | int] | None) -> str:
    if s is None:
        return "-"
    return f"{s['p50']:.2f} / {s['max']:.2f}  (n={s['n']})"


def is_anomalous(v: Verdict) -> bool:
    return bool(v.lost or v.duplicated or v.no_finished_event or v.status_mismatch
                or v.regressions or v.wrong_output or v.resumed_flag_mismatch
                or v.rollbacks or v.status != "succeeded")


def build_report(p: Params, plan: Sequence[PlannedTask], verdicts: Sequence[Verdict],
                 kills: Sequence[KillRecord], fails: Sequence[Failover],
                 timings: dict[str, float], evidence: dict[str, Any]) -> dict[str, Any]:
    status = Counter(v.status for v in verdicts)
    by_signal = Counter(k.signal for k in kills)
    seconds = {sig: [f.seconds for f in fails if f.signal == sig and f.seconds is not None]
               for sig in ("SIGKILL", "SIGTERM")}
    drains = [k.exit_s for k in kills if k.signal == "SIGTERM" and k.exit_s is not None]
    counts = {
        "submitted": len(plan), "counter_tasks": sum(1 for t in plan if t.kind == "counter"),
        "succeeded": status["succeeded"], "failed": status["failed"],
        "timed_out": status["timed_out"], "cancelled": status["cancelled"],
        "dead": status["dead"], "lost": sum(v.lost for v in verdicts),
        "duplicated": sum(v.duplicated for v in verdicts),
        "no_finished_event": sum(v.no_finished_event for v in verdicts),
        "finished_status_mismatch": sum(v.status_mismatch for v in verdicts),
        "resumed_from_checkpoint": sum(v.resumed_from_checkpoint for v in verdicts),
        "checkpoint_regressions": sum(1 for v in verdicts if v.regressions),
        "wrong_output": sum(v.wrong_output for v in verdicts),
        "unannounced_restores": sum(1 for v in verdicts if v.resumed_flag_mismatch),
        "slow_sigterm_drains": sum(1 for k in kills if k.signal == "SIGTERM"
                                   and (k.exit_s or 0) > SLOW_DRAIN_S),
        "attempts_lost_with_executor": sum(v.lost_attempts for v in verdicts),
        "hand_backs": sum(v.handed_back for v in verdicts),
        "checkpoint_rollbacks": sum(v.rollbacks for v in verdicts),
        "drain_snapshots_clean": sum(v.drains_clean for v in verdicts),
        "drain_snapshots_unclean": sum(v.drains_unclean for v in verdicts),
        "drain_snapshots_skipped": evidence["drain_snapshots_skipped"],
        "kills": len(kills), "kill9": by_signal["SIGKILL"], "sigterm": by_signal["SIGTERM"],
        "kills_with_errors": sum(1 for k in kills if k.errors),
        "tasks_hit_by_kills": len(fails),
        "hit_finished_on_node": sum(1 for f in fails if f.outcome == "finished_on_node"),
        "hit_no_restart": sum(1 for f in fails if f.outcome == "no_restart"),
        "kill9_orphan_overlaps": sum(1 for f in fails if (f.orphan_overlap_s or 0) > 0),
        "kill9_orphans_seen": sum(1 for f in fails if f.orphan_overlap_s is not None),
    }
    overlaps = [f.orphan_overlap_s for f in fails if (f.orphan_overlap_s or 0) > 0]
    bad = [asdict(v) for v in verdicts if is_anomalous(v)]
    return {
        "counts": counts,
        "failover_s": {"SIGKILL": stats(seconds["SIGKILL"]), "SIGTERM": stats(seconds["SIGTERM"])},
        "sigterm_drain_s": stats(drains),
        "orphan_overlap_s": stats([x for x in overlaps if x is not None]),
        "restart_ready_s": stats([k.ready_s for k in kills if k.ready_s is not None]),
        "timings_s": timings, "anomalous_tasks": bad, "evidence": evidence,
        "kills": [asdict(k) for k in kills], "failovers": [asdict(f) for f in fails],
        "params": asdict(p),
    }


def render(report: dict[str, Any]) -> str:
    c, f, t = report["counts"], report["failover_s"], report["timings_s"]
    logs_found = report["evidence"]["logs"]["counts"]
    rows = [
        ("submitted", f"{c['submitted']}  ({c['counter_tasks']} counter agents)"),
        ("succeeded", str(c["succeeded"])),
        ("failed", str(c["failed"])),
        ("timed out", str(c["timed_out"])),
        ("dead", str(c["dead"])),
        ("lost (not terminal / no state)", str(c["lost"])),
        ("duplicated outcomes", str(c["duplicated"])),
        ("terminal without finished event", str(c["no_finished_event"])),
        ("resumed from checkpoint", str(c["resumed_from_checkpoint"])),
        ("checkpoint regressions", str(c["checkpoint_regressions"])),
        ("checkpoint rollbacks (confessed)", str(c["checkpoint_rollbacks"])),
        ("drain snapshots kept clean / unclean / skipped",
         f"{c['drain_snapshots_clean']} / {c['drain_snapshots_unclean']} / "
         f"{c['drain_snapshots_skipped']}"),
        ("wrong agent output", str(c["wrong_output"])),
        ("restored workspace, VIGIL_RESUMED=0", str(c["unannounced_restores"])),
        ("executor kills", f"{c['kills']}  (kill -9: {c['kill9']}, SIGTERM: {c['sigterm']})"),
        ("tasks running at a kill", f"{c['tasks_hit_by_kills']}  (finished on the node anyway: "
                                    f"{c['hit_finished_on_node']}, never restarted: "
                                    f"{c['hit_no_restart']})"),
        ("attempts lost / hand-backs", f"{c['attempts_lost_with_executor']} / {c['hand_backs']}"),
        ("failover kill -9  p50 / max (s)", fmt_stats(f["SIGKILL"])),
        ("failover SIGTERM  p50 / max (s)", fmt_stats(f["SIGTERM"])),
        ("kill -9: orphan still running at next start",
         f"{c['kill9_orphan_overlaps']} of {c['kill9_orphans_seen']}  (overlap p50 / max: "
         f"{fmt_stats(report['orphan_overlap_s']).split('  ')[0]} s)"),
        ("SIGTERM drain (signal→exit) p50 / max", fmt_stats(report["sigterm_drain_s"])),
        (f"SIGTERM drains slower than {SLOW_DRAIN_S:.0f}s", str(c["slow_sigterm_drains"])),
        ("containers left after the final drain",
         str(len(report["evidence"]["containers_left_after_drain"]))),
        ("kill→executor ready again p50 / max", fmt_stats(report["restart_ready_s"])),
        ("crash lines in service logs", ", ".join(f"{k}: {v}" for k, v in logs_found.items())
         or "none"),
        ("wall time (s)", f"{t['total']:.0f}  (submit→all terminal: {t['tasks']:.0f})"),
    ]
    return table([("metric", "value"), *rows])


def write_results(stamp: str, report: dict[str, Any]) -> Path:
    return write_json(f"soak-{stamp}", {**report, "environment": environment()})


def keep_logs(stamp: str, run_dir: Path) -> Path:
    dest = RESULTS_DIR / f"soak-{stamp}-logs"
    dest.mkdir(parents=True, exist_ok=True)
    for path in [*run_dir.glob("*.log"), run_dir / "nats" / "nats-server.log"]:
        if path.exists():
            shutil.copy2(path, dest / path.name)
    return dest


# The stack ----------------------------------------------------------------------------------------
class Stack:
    """Everything this run starts, so that ``close()`` can stop and remove all of it."""

    def __init__(self, run_dir: Path, stamp: str) -> None:
        self.run_dir = run_dir
        self.stamp = stamp
        self.nats: NatsServer | None = None
        self.podman: PodmanService | None = None
        self.nc: NATS | None = None
        self.scheduler: Scheduler | None = None
        self.scheduler_task: asyncio.Task[None] | None = None
        self.executors: list[ExecutorProc] = []
        self.leftovers: dict[str, int] = {}

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(timeout=10)

    async def start(self, p: Params) -> None:
        # As shipped: every service under its own least-privilege user (vigil.permissions);
        # the soak itself reads as admin, and its log is scanned for violations at the end.
        self.nats = NatsServer(store_dir=self.run_dir / "nats", sync_always=True,
                               users=shipped_users(random_passwords()))
        await self.nats.start()
        say(f"nats-server {self.nats.url} (sync_interval: always, the shipped users)")
        self.podman = PodmanService(self.run_dir / "podman.log",
                                    tag=f"soak-{os.getpid()}-{self.stamp}")
        await self.podman.start()
        say(f"podman {self.podman.url} (rootless, as {self.podman.user_name})")
        self.nc = await nats.connect(self.nats.url_for("admin"), name="vigil-soak",
                                     connect_timeout=5)
        await topology.ensure_topology(self.js)
        await self._start_scheduler()
        await self._start_executors(p)

    async def _start_scheduler(self) -> None:
        assert self.nats is not None
        log_to_file(self.run_dir / "scheduler.log")
        self.scheduler = Scheduler(SchedulerSettings(nats_url=self.nats.url_for("scheduler"),
                                                     http_port=0))
        self.scheduler_task = asyncio.create_task(self.scheduler.run())
        ready = asyncio.create_task(self.scheduler.ready.wait())
        done, _ = await asyncio.wait({ready, self.scheduler_task}, timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            raise BenchError("the scheduler did not start within 30s; see scheduler.log")
        say("scheduler running in this process")

    async def _start_executors(self, p: Params) -> None:
        assert self.nats is not None and self.podman is not None
        state_root = self.run_dir / "state"
        for i in range(p.executors):
            node = f"{NODE_PREFIX}{i}"
            env = executor_env(self.nats.url_for("executor"), self.podman.url, node, p,
                               state_root / node)
            self.executors.append(ExecutorProc(node, self.run_dir / f"executor-{node}.log", env,
                                               executor_argv(p)))
        for e in self.executors:
            await e.start()
        await asyncio.gather(*(e.wait_ready() for e in self.executors))
        say(f"{p.executors} executors ready ({p.slots} slots each, ack wait {ACK_WAIT_S}s, "
            f"heartbeat {HEARTBEAT_S}s, stop grace {STOP_GRACE_S}s)")

    async def stop_executors(self) -> list[str]:
        """Drain every executor; the nodes that did not exit within the bound."""
        results = await asyncio.gather(*(e.stop() for e in self.executors))
        return [e.node_id for e, ok in zip(self.executors, results, strict=True) if not ok]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_executors()
        await self._stop_scheduler()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.podman is not None:
            with contextlib.suppress(Exception):
                self.leftovers = await remove_soak_containers(self.podman)
            await self.podman.stop()
        if self.nats is not None:
            await self.nats.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _stop_scheduler(self) -> None:
        if self.scheduler is None or self.scheduler_task is None:
            return
        await self.scheduler.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait({self.scheduler_task}, timeout=15)
        if not self.scheduler_task.done():
            self.scheduler_task.cancel()


def log_to_file(path: Path) -> None:
    """The in-process scheduler logs JSON lines to a file, not over the report."""
    logs.setup("vigil-scheduler", "info", "json")
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]


def podman_http(podman: PodmanService) -> aiohttp.ClientSession:
    assert podman.socket is not None
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(podman.socket)), base_url="http://podman",
        timeout=aiohttp.ClientTimeout(total=60))


async def soak_containers(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """Every container a ``soak-*`` executor created (by its labels), running or not."""
    filters = json.dumps({"label": [f"{LABEL_MANAGED}=1"]})
    async with http.get(f"{PODMAN_API}/containers/json",
                        params={"all": "true", "filters": filters}) as r:
        found = await r.json() if r.status == 200 else []
    return [c for c in found or []
            if str((c.get("Labels") or {}).get(LABEL_EXECUTOR, "")).startswith(NODE_PREFIX)]


async def leftover_containers(podman: PodmanService) -> list[str]:
    """After every executor drained, there should be none: each attempt removes its own."""
    async with podman_http(podman) as http:
        return [f"{(c.get('Names') or ['?'])[0]} ({c.get('State')})"
                for c in await soak_containers(http)]


async def remove_soak_containers(podman: PodmanService) -> dict[str, int]:
    """Containers of ``soak-*`` executors and their workspace volumes, by label and name."""
    removed = {"containers": 0, "volumes": 0}
    async with podman_http(podman) as http:
        for c in await soak_containers(http):
            async with http.delete(f"{PODMAN_API}/containers/{c['Id']}",
                                   params={"force": "true", "t": "0"}):
                removed["containers"] += 1
        async with http.get(f"{PODMAN_API}/volumes/json") as r:
            volumes = await r.json() if r.status == 200 else []
        for v in volumes or []:
            if str(v.get("Name", "")).startswith(VOLUME_PREFIX):
                async with http.delete(f"{PODMAN_API}/volumes/{v['Name']}",
                                       params={"force": "true"}):
                    removed["volumes"] += 1
    return removed


# The run ------------------------------------------------------------------------------------------
async def stuck_report(js: JetStreamContext, store: TaskStore, pending: Iterable[str]
                       ) -> dict[str, Any]:
    """What the tasks left at the deadline look like, and the executors' work consumer."""
    tasks = {}
    for task_id in sorted(pending):
        got = await store.get(TENANT, task_id)
        s = got[0] if got else None
        tasks[task_id] = None if s is None else {
            "status": s.status, "attempt": s.attempt, "executor": s.executor,
            "updated_at": s.updated_at.isoformat(), "delivery": s.delivery,
            "history": [(h.attempt, h.executor, h.outcome) for h in s.history]}
    info: Any = None
    with contextlib.suppress(Exception):
        ci = await js.consumer_info(subjects.STREAM_WORK, subjects.consumer_executor("default"))
        info = {"num_pending": ci.num_pending, "num_ack_pending": ci.num_ack_pending,
                "num_redelivered": ci.num_redelivered, "num_waiting": ci.num_waiting}
    return {"tasks": tasks, "work_consumer": info}


async def soak(p: Params) -> int:
    started = datetime.now(UTC)
    stamp = f"{started:%Y%m%dT%H%M%SZ}"
    run_dir = Path(tempfile.mkdtemp(prefix="vigil-soak-"))
    # Rootless Podman (another uid) must traverse it to bind-mount the control dirs.
    os.chmod(run_dir, 0o711)  # noqa: S103 - traverse only; nothing in it is listable
    rng = random.Random(p.seed)
    say(f"parameters: {p}; run dir {run_dir}")
    stack = Stack(run_dir, stamp)
    try:
        await stack.start(p)
        return await drive(p, stack, rng, stamp)
    finally:
        say("cleaning up")
        await stack.close()
        if stack.leftovers.get("containers"):
            say(f"removed leftovers at the end: {stack.leftovers}")


async def drive(p: Params, stack: Stack, rng: random.Random, stamp: str) -> int:
    assert stack.nc is not None
    js = stack.js
    store = await TaskStore.open(js)
    live = LiveEvents()
    await live.subscribe(stack.nc)
    plan = plan_tasks(p.tasks, f"t{stamp[:-1]}", rng)
    progress = Progress(store, [t.id for t in plan], live)
    chaos = Chaos(stack.executors, store, progress, rng, p.diagnose)

    t_submit = time.monotonic()
    await submit(js, plan)
    say(f"submitted {len(plan)} tasks ({sum(t.kind == 'counter' for t in plan)} counter agents)")
    until = None if p.minutes is None else t_submit + p.minutes * 60
    chaos_task = asyncio.create_task(chaos.run(until))
    try:
        done = await progress.wait_all(t_submit + p.timeout_min * 60, chaos)
    except BaseException:
        chaos_task.cancel()  # interrupted: no waiting for restarts, close() stops everything
        raise
    chaos.stop.set()  # no more kills; the restarts in progress complete (bounded)
    await asyncio.wait({chaos_task}, timeout=EXIT_TIMEOUT_S + READY_TIMEOUT_S + 10)
    chaos_task.cancel()
    t_tasks = time.monotonic() - t_submit
    say(f"{'all tasks terminal' if done else 'TIMED OUT'} after {t_tasks:.0f}s; "
        f"{chaos.summary()}")
    stuck = None if done else await stuck_report(js, store, progress.pending)
    not_exited = await stack.stop_executors()
    assert stack.podman is not None
    leftovers = await leftover_containers(stack.podman)
    end = RunEnd(done, {"tasks": t_tasks, "total": time.monotonic() - T0}, stuck, not_exited,
                 leftovers)
    return await verify_and_report(p, stack, plan, chaos, live, stamp, end)


@dataclass
class RunEnd:
    """How the run ended, before verification."""

    done: bool  # every task terminal before the deadline
    timings: dict[str, float]
    stuck: dict[str, Any] | None  # the tasks left at the deadline
    not_exited: list[str]  # executors that did not drain within the bound at the end
    leftovers: list[str]  # soak containers still there after every executor drained


async def verify_and_report(p: Params, stack: Stack, plan: Sequence[PlannedTask], chaos: Chaos,
                            live: LiveEvents, stamp: str, end: RunEnd) -> int:
    js = stack.js
    say("verifying from the durable stores (KV vigil-tasks, streams VIGIL_EVENTS and "
        "VIGIL_OUTPUT)")
    stored = await read_tasks(js, await TaskStore.open(js), [t.id for t in plan])
    verdicts = [judge(t, *stored[t.id]) for t in plan]
    executor_logs = sorted(stack.run_dir.glob("executor-*.log"))
    fails = failovers(chaos.kills, live, stored, orphan_removals(executor_logs))
    issues = await read_stored(js, f"{subjects.ISSUES}.>", subjects.STREAM_ISSUES)
    logs_dir = keep_logs(stamp, stack.run_dir)
    log_paths = [*executor_logs, stack.run_dir / "scheduler.log",
                 stack.run_dir / "nats" / "nats-server.log"]
    evidence = {"logs": scan_logs(log_paths), "confessions": summarize_confessions(issues),
                "drain_snapshots_skipped": skipped_drain_snapshots(executor_logs),
                "stuck": end.stuck, "executors_not_exiting_at_end": end.not_exited,
                "containers_left_after_drain": end.leftovers,
                "timelines": {v.task_id: timeline(stored[v.task_id][1])
                              for v in verdicts if is_anomalous(v)},
                "logs_dir": str(logs_dir)}
    report = build_report(p, plan, verdicts, chaos.kills, fails, end.timings, evidence)
    print(render(report))
    print_findings(report)
    path = write_results(stamp, report)
    print(f"results: {path.relative_to(ROOT)}   logs: {logs_dir.relative_to(ROOT)}")
    return exit_status(report, end.done, p)


def timeline(events: Iterable[dict[str, Any]]) -> list[str]:
    """A task's stored events in one line each: the evidence for an anomalous task."""
    keys = ("executor", "resumed", "status", "reason", "name", "ok", "note", "error", "summary")
    out = []
    for e in events:
        detail = {k: e[k] for k in keys if e.get(k) not in (None, {}, "")}
        if e.get("kind") == "log":
            detail["lines"] = e.get("lines", [])[:3]
        out.append(f"{e.get('time')} {e.get('kind')} a{e.get('attempt')} "
                   f"{json.dumps(detail, default=str)[:300]}")
    return out


def print_findings(report: dict[str, Any]) -> None:
    ev, bad = report["evidence"], report["anomalous_tasks"]
    for v in bad[:10]:
        print(f"  ! task {v['task_id']} ({v['kind']}): status={v['status']} attempt="
              f"{v['attempt']} finished={v['finished_attempts']} starts={v['starts']} "
              f"resumed={v['resumed_flags']} regressions={v['regressions']}")
    for k in report["kills"]:
        if k["signal"] == "SIGTERM" and (k["exit_s"] or 0) > SLOW_DRAIN_S:
            print(f"  ! kill #{k['n']} SIGTERM {k['node']}: took {k['exit_s']:.1f}s to exit")
    for name in ev["containers_left_after_drain"]:
        print(f"  ! container left after the final drain: {name}")
    for c in ev["confessions"]["serious"][:5]:
        print(f"  ! confession {c['severity']}/{c['category']}: {str(c['summary'])[:250]}")
    for pattern, lines in ev["logs"]["examples"].items():
        for line in lines[:2]:
            print(f"  ! log {pattern}: {line[:300]}")
    for k in report["kills"]:
        for err in k["errors"]:
            print(f"  ! kill #{k['n']} {k['signal']} {k['node']}: {err}")
    if ev["stuck"]:
        print(f"  ! stuck at the deadline: {json.dumps(ev['stuck'], default=str)[:2000]}")
    if ev["executors_not_exiting_at_end"]:
        print("  ! executors that ignored SIGTERM at the end: "
              f"{ev['executors_not_exiting_at_end']}")


def exit_status(report: dict[str, Any], done: bool, p: Params) -> int:
    c = report["counts"]
    if c["lost"] or c["duplicated"] or not done:
        return 1
    if c["kills"] < p.min_kills:
        say(f"only {c['kills']} kills happened while tasks ran (minimum {p.min_kills}): "
            "use more --tasks")
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parse_args(argv)
    return run_main(lambda: soak(p), failed="soak failed", error_status=2, say=say)


if __name__ == "__main__":
    sys.exit(main())
