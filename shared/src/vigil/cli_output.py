"""How the ``vigil`` command line prints: exit codes, colours, tables, a live status line.

Colour only on a terminal and never with ``NO_COLOR`` set (https://no-color.org); the
status line is drawn on stderr only when stderr is a terminal, so pipes and files get
exactly the program's output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from vigil.client import GatewayError, StreamEvent, WaitTimeout
from vigil.errors import ApiError, VigilError
from vigil.messages import TaskState

# Exit codes, shared by every subcommand: EXIT_STATUSES says what each means (`vigil
# --help` and the README list them), exit_code() decides which one an error ends in.
EXIT_OK = 0
EXIT_TASK_FAILED = 1  # the task ended other than `succeeded`, or it does not exist (404)
EXIT_USAGE = 2  # wrong flags or input, or the gateway refused the request (4xx but 404, 429)
EXIT_UNREACHABLE = 3  # no gateway answered, or it (or NATS behind it) failed (5xx)
EXIT_RATE_LIMITED = 4  # 429: the token's rate limit or the tenant's quota; retry later
EXIT_TIMEOUT = 124  # `wait --timeout` ran out; the task is still going (as timeout(1))
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "ok; the task succeeded"),
    (EXIT_TASK_FAILED, "the task ended otherwise (failed, cancelled, timed_out, dead), or "
     "what was named does not exist (HTTP 404)"),
    (EXIT_USAGE, "bad usage or input, or the gateway refused the request (HTTP 4xx other "
     "than 404 and 429: a bad token, a missing role, an invalid spec, a conflict)"),
    (EXIT_UNREACHABLE, "no gateway (or NATS) reachable, or the gateway failed (HTTP 5xx)"),
    (EXIT_RATE_LIMITED, "rate limited, or over a tenant quota (HTTP 429): retry after the "
     "time the message gives"),
    (EXIT_TIMEOUT, "a --timeout ran out (the task itself goes on)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
# What the codes every gateway command may end in mean, in a subcommand's help.
COMMON_EXITS: tuple[tuple[int, str], ...] = (
    (EXIT_USAGE, "bad input or refused"), (EXIT_UNREACHABLE, "no gateway"),
    (EXIT_RATE_LIMITED, "rate limited"))

STATUS_COLORS = {
    "queued": "2", "scheduled": "2", "running": "36", "succeeded": "32", "failed": "31",
    "cancelled": "33", "timed_out": "31", "dead": "1;31",
}


def exit_code(exc: VigilError) -> int:
    """The exit status of a command that ``exc`` ended: the one mapping from errors (the
    gateway's answers among them) to exit codes, which every command goes by."""
    if isinstance(exc, WaitTimeout):
        return EXIT_TIMEOUT
    if isinstance(exc, ApiError):
        if exc.status == 404:
            return EXIT_TASK_FAILED
        if exc.status == 429:
            return EXIT_RATE_LIMITED
        if exc.status >= 500:
            return EXIT_UNREACHABLE
        return EXIT_USAGE
    # Not the gateway's answer: unreachable or timed out (retryable), or bad input here.
    return EXIT_UNREACHABLE if exc.retryable else EXIT_USAGE


def error_text(exc: VigilError) -> str:
    """``exc`` as a message that says what to do next."""
    if not isinstance(exc, ApiError):
        return str(exc)
    status = exc.status
    if status == 401:
        return (f"{exc}; pass --token or set VIGIL_TOKEN (a token comes from `vigil token "
                "create`); `vigil config show` tells which token is in use")
    if status == 403:
        return f"{exc}; ask an operator for a token with that role"
    if status == 429:
        wait = exc.retry_after if isinstance(exc, GatewayError) else None
        after = f" in {wait:g}s" if wait else " later"
        if isinstance(exc, GatewayError) and exc.code == "quota_exceeded":
            return f"{exc}; the tenant is over one of its limits: retry{after}"
        return f"{exc}; the gateway is rate limiting this token: retry{after}"
    if status >= 500:
        return f"{exc}; the gateway or NATS behind it is in trouble: see its log, retry " \
            "shortly"
    field = f" (field {exc.field})" if exc.field and exc.field not in str(exc) else ""
    return f"{exc}{field}"


def exit_epilog(*own: tuple[int, str], common: bool = True) -> str:
    """A subcommand's ``exit status:`` help: what its ``own`` codes mean, and (``common``)
    the codes any gateway command may end in that it does not explain itself."""
    meanings = dict(own)
    for code, meaning in COMMON_EXITS if common else ():
        meanings.setdefault(code, meaning)
    text = "; ".join(f"{code} {meaning}" for code, meaning in sorted(meanings.items()))
    return textwrap.fill(f"exit status: {text} (see `vigil --help`)", width=88,
                         break_long_words=False, break_on_hyphens=False)


def wants_color(out: TextIO) -> bool:
    return out.isatty() and not os.environ.get("NO_COLOR")


def paint(code: str, text: str, enabled: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if enabled and code and text.strip() else text


def status_text(status: str, color: bool) -> str:
    """The status, in its colour when ``color``."""
    return paint(STATUS_COLORS.get(status, ""), status, color)


def labels_text(labels: Mapping[str, str]) -> str:
    """``a=1,b=2``: labels sorted by key."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def terminal_width(out: TextIO) -> int | None:
    """The width to cut a table to: the terminal's, or None when ``out`` is not one."""
    return shutil.get_terminal_size().columns if out.isatty() else None


def age(when: datetime, now: datetime | None = None) -> str:
    """A compact age: ``12s``, ``5m``, ``3h``, ``2d``, ``7w``."""
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
          colors: Sequence[Sequence[str]] | None = None, color: bool = False,
          width: int | None = None, right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as aligned columns, two spaces apart; the last column is cut to ``width``.

    ``colors`` holds an ANSI code per cell (or ""): padding is computed on the plain text,
    so coloured columns stay aligned.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    out = []
    for r, row in enumerate([list(headers), *rows]):
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            text = cell if last else (cell.rjust(widths[i]) if i in right
                                      else cell.ljust(widths[i]))
            if last and width is not None:
                room = max(8, width - sum(w + 2 for w in widths[:-1]))
                if len(text) > room:
                    text = text[: room - 1] + "…"
            code = colors[r - 1][i] if colors is not None and r > 0 else ""
            cells.append(paint(code, text, color))
        out.append("  ".join(cells).rstrip())
    return out


class Printer:
    """Human-readable task output: log lines, progress, confessions, the outcome."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.color = wants_color(out)

    def _c(self, code: str, text: str) -> str:
        return paint(code, text, self.color)

    def event(self, ev: StreamEvent) -> None:
        d = ev.data
        if ev.kind == "log":
            mark = self._c("2", "│") if d.get("stream") == "stdout" else self._c("31", "│")
            for line in d.get("lines", []):
                print(f"  {mark} {line}", file=self.out)
        elif ev.kind == "progress":
            data = d.get("data", {})
            load = data.get("image_load") if isinstance(data, dict) else None
            if isinstance(load, dict):  # the executor loading the image from the store
                print(f"  {self._c('2', '⬇ image')} {load.get('image')} {load.get('step')} "
                      f"{load.get('percent')}%", file=self.out)
            else:
                text = " ".join(f"{k}={v}" for k, v in data.items())
                print(f"  {self._c('36', '▸ progress')} {text}", file=self.out)
        elif ev.kind == "started":
            print(f"  {self._c('2', '… started')} attempt {d.get('attempt')} on "
                  f"{d.get('executor')} in {d.get('image')}", file=self.out)
        elif ev.kind == "confession":
            print(f"  {self._c('33', '⚑ confession')} [{d.get('severity')}] "
                  f"{d.get('summary')}", file=self.out)
        elif ev.kind == "retrying":
            print(f"  {self._c('33', '↻ retrying')} {d.get('reason')}", file=self.out)
        elif ev.kind == "cancelling":
            reason = f": {d['reason']}" if d.get("reason") else ""
            print(f"  {self._c('33', '■ cancelling')}{reason}", file=self.out)
        elif ev.kind == "checkpoint":
            print(f"  {self._c('36', '⬇ checkpoint')} {d.get('size')} bytes", file=self.out)
        elif ev.kind == "environment":
            print(f"  {self._c('36', '◆ environment')} {d.get('environment')} {d.get('step')} "
                  f"(revision {d.get('revision')})", file=self.out)
        elif ev.kind == "egress":
            self._egress(d)
        self.out.flush()

    def _egress(self, d: dict[str, Any]) -> None:
        target = f"{d.get('host')}:{d.get('port')}"
        if d.get("allowed"):
            print(f"  {self._c('2', '⇄ egress')} {target} ({d.get('address')}): "
                  f"{d.get('bytes_out', 0)} bytes out, {d.get('bytes_in', 0)} in, "
                  f"{d.get('duration_s', 0.0):.1f}s", file=self.out)
        else:
            print(f"  {self._c('31', '⇄ egress refused')} {target}: {d.get('reason')}",
                  file=self.out)

    def outcome(self, state: TaskState, expected: str = "succeeded") -> None:
        ok = state.status == expected
        mark = self._c("32", "✔") if ok else self._c("31", "✘")
        took = ""
        if state.started_at and state.finished_at:
            took = f" in {(state.finished_at - state.started_at).total_seconds():.1f}s"
        code = f" (exit {state.exit_code})" if state.exit_code is not None else ""
        print(f"{mark} task {state.id} {state.status}{took}{code}", file=self.out)
        if state.error:
            print(f"  error: {state.error}", file=self.out)
        self.out.flush()


class StatusLine:
    """One self-rewriting line on stderr (a terminal) saying what a task is doing.

    ``print_line`` writes program output to stdout without tearing the status line: it
    clears the line, prints, and redraws. On anything but a terminal it does nothing.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, err: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.err = err or sys.stderr
        self.enabled = self.err.isatty() if enabled is None else enabled
        self.color = wants_color(self.err)
        self.text = ""
        self._frame = 0
        self._shown = False
        self._spinner: asyncio.Task[None] | None = None

    def describe(self, task_id: str, state: TaskState | None) -> None:
        """``task t_… running · attempt 2 on node-b · 41s`` (time in that status)."""
        if state is None:
            self.set(f"task {task_id}: asking the gateway…")
            return
        parts = [f"task {task_id} {status_text(state.status, self.color)}"]
        if state.attempt:
            where = f" on {state.executor}" if state.executor and state.status == "running" \
                else ""
            parts.append(f"attempt {state.attempt}{where}")
        if state.cancel_requested_at and not state.terminal:
            parts.append("cancelling")
        since = state.started_at if state.status == "running" and state.started_at \
            else state.updated_at
        parts.append(age(since))
        self.set(" · ".join(parts))

    def set(self, text: str) -> None:
        self.text = text
        self.draw()

    def draw(self) -> None:
        if not self.enabled or not self.text:
            return
        frame = self.FRAMES[self._frame % len(self.FRAMES)]
        room = shutil.get_terminal_size((100, 20)).columns - 3
        self.err.write(f"\r\033[K{frame} {self.text[:room + 20]}")
        self.err.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self._shown = False

    def print_line(self, line: str, out: TextIO | None = None) -> None:
        target = out or sys.stdout
        self.clear()
        print(line, file=target, flush=True)
        self.draw()

    def start(self) -> None:
        if self.enabled and self._spinner is None:
            self._spinner = asyncio.create_task(self._spin())

    async def _spin(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._frame += 1
            self.draw()

    async def stop(self) -> None:
        if self._spinner is not None:
            self._spinner.cancel()
            await asyncio.wait([self._spinner])
            self._spinner = None
        self.clear()


def out_json(data: Any) -> str:
    """Compact JSON for ``--json`` output (datetimes as RFC 3339)."""
    import msgspec

    return msgspec.json.encode(data).decode()
