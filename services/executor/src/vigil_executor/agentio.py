"""The agent's side of the contract as the executor sees it: output lines and control lines.

Ordinary lines become ``log`` events, batched (a batch ends at 100 lines, 64 KiB, 50 ms,
or when the other stream writes) so a chatty agent costs a few publishes per second
rather than one per line. A stdout line ``::vigil::<command> <json>`` is a control line:

- ``confess {json}``    -> a confession on ``vigil.issues.agent.<severity>`` + event
- ``progress {json}``   -> a ``progress`` event
- ``checkpoint {json}`` -> handed to the checkpoint hook

A malformed control line is kept as an ordinary log line, and the platform confesses it
once per task attempt. Nothing an agent prints can crash the executor. The task's secret
values are masked (``***``, see :class:`~vigil_executor.secrets.Masker`) in every line
before anything else looks at it.

Limits on output: past ``limit_bytes`` (the task's ``resources.output_mb``, else the node's
``VIGIL_OUTPUT_MB``) of stored output per attempt, ordinary lines and ``progress`` events are
dropped, counted and never stored; one marker line says so on stderr (and ``on_limit``
is called once, for the platform's confession), and :meth:`AgentOutput.close` adds a last
marker with the total dropped. The container's output is still read as fast as it comes
(the agent never blocks on a full pipe), and ``confess`` and ``checkpoint`` control lines
are still honoured: they have their own limits.

Limits on confessions: a ``confess`` line longer than ``MAX_CONTROL_BYTES`` is refused
explicitly (a platform confession "confession too large (N bytes > limit)"), not cut into
a malformed one; fields past their lengths are cut with a visible marker; and a token
bucket per task attempt (:class:`ConfessionLimiter`) bounds how many get through.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from vigil.messages import (
    SEVERITIES,
    SUMMARY_CHARS,
    TAIL_LINES,
    Confession,
    Event,
    Log,
    Progress,
    utcnow,
)
from vigil_executor.runtime import Stream, TruncatedLine
from vigil_executor.secrets import NO_MASK, Masker

log = structlog.get_logger("vigil.executor.agentio")

PREFIX = "::vigil::"
MAX_CONTROL_BYTES = 16_384
BATCH_LINES = 100
BATCH_BYTES = 64 * 1024
BATCH_DELAY_S = 0.05

_json = msgspec.json.Decoder()


@dataclass(frozen=True)
class Control:
    command: str
    payload: dict[str, Any]


class ControlError(ValueError):
    pass


class ConfessionTooLarge(ControlError):
    """A ``confess`` line over the size limit: refused, and said so with its size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"confession too large ({size} bytes > {limit} byte limit)")
        self.size = size
        self.limit = limit


def parse_control(line: str, size: int | None = None, limit: int = MAX_CONTROL_BYTES,
                  ) -> Control | None:
    """``::vigil::cmd {json}`` -> Control; None for an ordinary line; ControlError if bad.

    ``size`` is the line's real length in bytes (more than ``line`` holds when the output
    reader cut it at ``limit``)."""
    if not line.startswith(PREFIX):
        return None
    rest = line[len(PREFIX):]
    command, _, arg = rest.partition(" ")
    if command not in ("confess", "progress", "checkpoint"):
        raise ControlError(f"unknown control command {command!r}")
    size = len(line.encode()) if size is None else size
    if size > limit:
        if command == "confess":
            raise ConfessionTooLarge(size, limit)
        raise ControlError(f"{command}: control line of {size} bytes is longer than the "
                           f"{limit} byte limit")
    payload: Any = {}
    if arg.strip():
        try:
            payload = _json.decode(arg)
        except msgspec.DecodeError as exc:
            raise ControlError(f"{command}: payload is not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise ControlError(f"{command}: payload must be a JSON object")
    if command == "confess":
        summary = payload.get("summary")
        severity = payload.get("severity", "warning")
        if not isinstance(summary, str) or not summary.strip():
            raise ControlError("confess: `summary` must be a non-empty string")
        if severity not in SEVERITIES:
            raise ControlError(f"confess: `severity` must be one of {', '.join(SEVERITIES)}")
    return Control(command, payload)


def clip(value: str, limit: int) -> str:
    """``value`` if it fits in ``limit`` characters, else its start and a marker saying
    how much was cut (the result still fits)."""
    if len(value) <= limit:
        return value
    marker = f" [truncated {len(value)} chars to {limit}]"
    return value[: max(0, limit - len(marker))] + marker


def agent_confession(payload: dict[str, Any]) -> Confession:
    known = {"summary", "severity", "category", "detail", "hint"}
    extra = {k: v for k, v in payload.items() if k not in known}

    def text(key: str, limit: int) -> str | None:
        value = payload.get(key)
        return None if value is None else clip(str(value), limit)

    return Confession(
        summary=clip(str(payload["summary"]), SUMMARY_CHARS),
        severity=payload.get("severity", "warning"),
        category=text("category", 128),
        detail=text("detail", 8_000),
        hint=text("hint", 2_000),
        data=extra,
    )


class ConfessionLimiter:
    """A token bucket: ``burst`` confessions at once, refilled at ``per_min`` a minute.

    What it refuses is counted; :meth:`report` hands that count over once, for the one
    platform confession about it."""

    def __init__(self, burst: int, per_min: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_min = per_min
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self.accepted = 0
        self.dropped = 0
        self._reported = False

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.burst),
                           self._tokens + (now - self._at) * self.per_min / 60.0)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.accepted += 1
            return True
        self.dropped += 1
        return False

    def report(self) -> int:
        """The number dropped, the first time it is asked after any were; then 0."""
        if self._reported or not self.dropped:
            return 0
        self._reported = True
        return self.dropped


Publish = Callable[[Event], None]
OnConfess = Callable[[Confession], Awaitable[None]]
OnCheckpoint = Callable[[dict[str, Any]], Awaitable[None]]
OnMalformed = Callable[[ControlError], Awaitable[None]]
OnLimit = Callable[["OutputLimit"], Awaitable[None]]

MIB = 1024 * 1024
PREFIX_BYTES = PREFIX.encode()


def mib(n: int) -> str:
    """``n`` bytes as MiB, one decimal (``45.2 MiB``)."""
    return f"{n / MIB:.1f} MiB"


@dataclass
class OutputLimit:
    """One attempt's output budget: what was stored, and what was dropped past it."""

    limit: int  # bytes of output an attempt may store
    stored: int = 0  # bytes stored (each line + its newline; markers are not counted)
    dropped: int = 0  # bytes dropped past the limit
    dropped_lines: int = 0

    @property
    def reached(self) -> bool:
        return self.dropped_lines > 0

    def take(self, size: int) -> bool:
        """Whether ``size`` more bytes may be stored; counts them either way. Once one
        line is dropped every later one is too, so what is stored is a prefix."""
        if not self.reached and self.stored + size <= self.limit:
            self.stored += size
            return True
        self.dropped += size
        self.dropped_lines += 1
        return False

    def marker(self, *, final: bool) -> str:
        """The line that says output was dropped (the first one, or the last, with the total)."""
        so_far = "" if final else " so far"
        return (f"[vigil: output limit {mib(self.limit)} reached; {mib(self.dropped)} "
                f"({self.dropped_lines} lines) dropped{so_far}; raise resources.output_mb "
                "to keep more]")


class AgentOutput:
    """Consumes (stream, line) from a container; emits events through ``emit``."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        emit: Publish,
        on_confess: OnConfess,
        on_checkpoint: OnCheckpoint,
        on_malformed: OnMalformed,
        masker: Masker = NO_MASK,
        limit_bytes: int | None = None,
        on_limit: OnLimit | None = None,
    ) -> None:
        self._task_id = task_id
        self.limit = OutputLimit(limit_bytes) if limit_bytes is not None else None
        self._on_limit = on_limit
        self._masker = masker  # the task's secret values: masked before anything else
        self._attempt = attempt
        self._emit = emit
        self._on_confess = on_confess
        self._on_checkpoint = on_checkpoint
        self._on_malformed = on_malformed
        self._stream: Stream | None = None
        self._lines: list[str] = []
        self._bytes = 0
        self._first = 0  # number of the first buffered line
        self._count = 0  # lines seen so far
        self._flush_handle: asyncio.TimerHandle | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.lines_by_stream = {"stdout": 0, "stderr": 0}
        self.malformed = 0

    async def feed(self, stream: Stream, raw: bytes) -> None:
        if (self.limit is not None and self.limit.reached
                and not (stream == "stdout" and raw.startswith(PREFIX_BYTES))):
            # Past the limit: count and drop without decoding or masking, so that reading
            # keeps up with an agent that prints as fast as it can.
            self.limit.take(len(raw) + 1)
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if self._masker:
            # Before the line is parsed: a control line's JSON carries a value escaped,
            # which is one of the forms masked; _dispatch masks the decoded payload too.
            line = self._masker.line(raw, line)
        if stream == "stdout" and line.startswith(PREFIX):
            if isinstance(raw, TruncatedLine):
                size, limit = raw.size, min(raw.limit, MAX_CONTROL_BYTES)
            else:
                size, limit = len(raw), MAX_CONTROL_BYTES
            try:
                control = parse_control(line, size, limit)
            except ConfessionTooLarge as exc:
                # Each one: the executor's rate limit bounds what they cost.
                await self._on_malformed(exc)
            except ControlError as exc:
                self.malformed += 1
                if self.malformed == 1:
                    await self._on_malformed(exc)
            else:
                if control is not None:
                    self.flush()  # keep the log and control events in output order
                    await self._dispatch(control, len(raw) + 1)
                    return
        if await self._over_limit(len(raw) + 1):
            return
        self._append(stream, line)

    async def _over_limit(self, size: int) -> bool:
        """Whether ``size`` bytes of output must be dropped; the first time they must, the
        marker is stored and ``on_limit`` told."""
        if self.limit is None:
            return False
        first = not self.limit.reached
        if self.limit.take(size):
            return False
        if first:
            self._append("stderr", self.limit.marker(final=False), counted=False)
            self.flush()
            if self._on_limit is not None:
                await self._on_limit(self.limit)
        return True

    def close(self) -> None:
        """The output has ended: store the last marker (the total dropped), if any was."""
        if self.limit is not None and self.limit.reached:
            self._append("stderr", self.limit.marker(final=True), counted=False)
        self.flush()
    async def _dispatch(self, control: Control, size: int) -> None:
        if control.command == "progress" and await self._over_limit(size):
            return  # progress is output too (it is stored beside the log)
        if self._masker:
            control = Control(control.command, self._masker.mask_any(control.payload))
        if control.command == "confess":
            await self._on_confess(agent_confession(control.payload))
        elif control.command == "progress":
            self._emit(Progress(
                task_id=self._task_id, attempt=self._attempt, time=utcnow(),
                data=control.payload,
            ))
        elif control.command == "checkpoint":
            await self._on_checkpoint(control.payload)

    def _append(self, stream: Stream, line: str, *, counted: bool = True) -> None:
        if self._stream is not None and stream != self._stream:
            self.flush()
        if not self._lines:
            self._stream = stream
            self._first = self._count
            self._flush_handle = asyncio.get_running_loop().call_later(BATCH_DELAY_S, self.flush)
        self._lines.append(line)
        self._bytes += len(line)
        self._count += 1
        if counted:
            self.lines_by_stream[stream] += 1
        self.tail.append(line)
        if len(self._lines) >= BATCH_LINES or self._bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._lines or self._stream is None:
            return
        self._emit(Log(
            task_id=self._task_id, attempt=self._attempt, time=utcnow(),
            stream=self._stream, lines=self._lines, first=self._first,
        ))
        self._lines = []
        self._bytes = 0
        self._stream = None

    @property
    def total_lines(self) -> int:
        return self._count
