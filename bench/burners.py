"""Are Vigil's own processes starved by agents that burn CPU?

Run from the repository root, as root (Podman runs as the unprivileged user ``vigil``, as
``vigil up`` does):

    .venv/bin/python bench/burners.py [--samples 10] [--repeats 3] [--burners 2]

A whole stack (rootless Podman, fsync always, as ``vigil up``) runs no-op container tasks
(``true``) one at a time and measures submit -> ``finished``. Each repetition measures
them twice, interleaved: idle, then with B agents each burning a core
(``python3 -c 'while True: pass'``) on this machine. The ratio with/idle is what a
runaway agent costs everyone else's latency; the target is under 2x. It also prints the
nice value the burners' processes ran at (``ps``), and their sessions' autogroup nice where
the kernel groups by session, which is how the platform keeps its own processes ahead of
agents on hosts without cgroup CPU control.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from common import T0, BenchError, environment, run_main, say, table, write_json
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from throughput import (
    TENANT,
    FinishedWatcher,
    check_podman_prereqs,
    running_stack,
    vigil_latency,
)

from vigil import subjects
from vigil.messages import CancelRequest
from vigil_executor.isolation import autogroup_enabled

BURN = "while True: pass"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="no-op tasks per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="idle/burning pairs")
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning agents")
    return parser.parse_args(argv)


class StartedWatcher:
    """Which task ids have a ``started`` event."""

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.started.add(subjects.token(msg.subject, 3) or "")
        self.changed.set()

    async def wait_for(self, ids: set[str], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not ids <= self.started:
                self.changed.clear()
                await self.changed.wait()


def burner_nice() -> list[str]:
    """The nice value of each process burning CPU for the bench (from ``ps``), with its
    session's autogroup nice value where the kernel weighs sessions first (``10 ag 10``)."""
    out = subprocess.run(["ps", "-eo", "ni=,pid=,args="], capture_output=True, text=True,
                         check=False).stdout
    found = []
    for line in out.splitlines():
        if BURN not in line:
            continue
        nice, pid = line.split()[:2]
        try:
            group = Path(f"/proc/{pid}/autogroup").read_text().split()[-1]
            found.append(f"{nice} ag {group}" if autogroup_enabled() else nice)
        except OSError:
            found.append(nice)
    return found


async def start_burners(js: JetStreamContext, started: StartedWatcher, tag: str, count: int
                        ) -> list[str]:
    ids = [f"{tag}-burn{i}" for i in range(count)]
    spec = json.dumps({"command": ["python3", "-c", BURN], "timeout_s": 600}).encode()
    for task_id in ids:
        await js.publish(subjects.submit(TENANT), spec, headers={subjects.MSG_ID: task_id})
    await started.wait_for(set(ids), 60)
    return ids


async def stop_burners(js: JetStreamContext, watcher: FinishedWatcher, ids: list[str]) -> None:
    done = [watcher.expect(i) for i in ids]
    for task_id in ids:
        await js.publish(subjects.cancel_request(TENANT), msgspec.json.encode(
            CancelRequest(task_id=task_id, reason="bench over")))
    async with asyncio.timeout(120):
        await asyncio.gather(*done)


async def run(args: argparse.Namespace) -> None:
    check_podman_prereqs()
    started_at = datetime.now(UTC)
    tag = f"u{started_at:%H%M%S}"
    idle: list[float] = []
    burning: list[float] = []
    nice: list[str] = []
    async with running_stack("podman", args.burners + 2, sync_always=True) as stack:
        nc = await nats.connect(stack.nats_url, name="vigil-bench-burners")
        try:
            js = nc.jetstream(timeout=30)
            watcher = FinishedWatcher()
            await watcher.start(nc)
            started = StartedWatcher()
            await nc.subscribe(subjects.events_of_kind("started"), cb=started.on_msg)
            say("warm-up: 3 no-op container tasks")
            await vigil_latency(js, watcher, 3, f"{tag}w", 120)
            for rep in range(args.repeats):
                quiet = await vigil_latency(js, watcher, args.samples, f"{tag}i{rep}", 120)
                idle.extend(quiet)
                burners = await start_burners(js, started, f"{tag}b{rep}", args.burners)
                nice.extend(burner_nice())
                loaded = await vigil_latency(js, watcher, args.samples, f"{tag}l{rep}", 120)
                burning.extend(loaded)
                await stop_burners(js, watcher, burners)
                say(f"rep {rep + 1}/{args.repeats}: idle median "
                    f"{statistics.median(quiet):.0f} ms, with {args.burners} burners "
                    f"{statistics.median(loaded):.0f} ms")
            await watcher.stop()
        finally:
            await nc.close()
    if not idle or not burning:
        raise BenchError("nothing measured")
    ratio = statistics.median(burning) / statistics.median(idle)

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):.0f} [{min(xs):.0f}–{max(xs):.0f}]"

    print(table([("no-op container task, submit → finished", "ms, median [min–max]", "ratio"),
                 ("idle", fmt(idle), "1.00"),
                 (f"{args.burners} agents burning CPU", fmt(burning), f"{ratio:.2f}")]))
    print(f"\n{args.samples} tasks × {args.repeats} repetitions each; burners' nice values "
          f"seen: {sorted(set(nice)) or 'none found'}; target ratio < 2.")
    path = write_json(f"burners-{started_at:%Y%m%dT%H%M%SZ}", {
        "started": started_at.isoformat(), "seconds": round(time.monotonic() - T0, 1),
        "params": vars(args), "environment": environment(),
        "idle_ms": idle, "burning_ms": burning, "ratio": ratio, "burner_nice": nice,
    })
    print(f"results: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = parse_args(argv)
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
