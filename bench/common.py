"""What the benchmark programs in bench/ share: progress lines, the error that ends a run,
``main``'s signal and exit-status handling, the table layout, and the results files.

The programs run as ``python bench/<name>.py``, so this is imported as a sibling module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from vigil.natsserver import find_binary

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
T0 = time.monotonic()


class BenchError(Exception):
    """The run cannot go on; :func:`run_main` reports it and exits non-zero."""


def say(text: str, *, width: int = 6) -> None:
    """Progress goes to stderr so that stdout holds only the result table."""
    print(f"[{time.monotonic() - T0:{width}.1f}s] {text}", file=sys.stderr, flush=True)


async def _cancel_on_sigterm(work: Callable[[], Awaitable[object]]) -> object:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM behaves like Ctrl-C: cancel, so every `finally` stops what it started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await work()


def run_main(work: Callable[[], Awaitable[object]], *, failed: str = "benchmark failed",
             error_status: int = 1, say: Callable[[str], None] = say) -> int:
    """Run ``work()`` and return the exit status: what it returns if that is an int, else 0;
    130 when interrupted (Ctrl-C or SIGTERM); ``error_status`` on a :class:`BenchError`."""
    try:
        status = asyncio.run(_cancel_on_sigterm(work))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; everything started was stopped")
        return 130
    except BenchError as exc:
        say(f"{failed}: {exc}")
        return error_status
    return status if isinstance(status, int) else 0


def table(lines: Sequence[tuple[str, ...]]) -> str:
    """A Markdown table: the first line is the header, every column padded to its widest."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def show(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([show(lines[0]), sep, *(show(line) for line in lines[1:])])


def environment(*, podman: bool = True) -> dict[str, Any]:
    """Where the numbers were measured, for the results file."""

    def run(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=10,
                                 check=False)
            return out.stdout.strip()
        return ""

    env: dict[str, Any] = {
        "host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(), "nats_server": run(find_binary(), "--version"),
    }
    if podman:
        env["podman"] = run("podman", "--version")
    env.update({
        "git_commit": run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain")),
        "loadavg_at_end": os.getloadavg(),
    })
    return env


def write_json(name: str, doc: dict[str, Any], *, indent: int = 2) -> Path:
    """Write ``doc`` to ``bench/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=indent, default=str) + "\n", encoding="utf-8")
    return path
