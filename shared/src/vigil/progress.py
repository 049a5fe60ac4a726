"""Rate limiting and progress display for operator tools (``vigil replay``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class TokenBucket:
    """At most ``rate`` takes per second on average, bursts up to ``burst``; rate <= 0 is
    unlimited. The clock and sleep are injectable for tests."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.rate = rate
        # A tenth of a second's worth: smooth, yet not a sleep per message at high rates.
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self.tokens = self.burst
        self._clock, self._sleep = clock, sleep
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    async def take(self, n: float = 1.0) -> None:
        if self.rate <= 0:
            return
        self._refill()
        # The epsilon: float rounding must not leave a 1e-17 shortfall to sleep on forever.
        while self.tokens < n - 1e-9:
            await self._sleep((n - self.tokens) / self.rate)
            self._refill()
        self.tokens = max(0.0, self.tokens - n)


def render_progress(label: str, done: int, total: int, elapsed_s: float, width: int = 24) -> str:
    """``label [#####-------] 120/500 24% 480/s ETA 1s``; total 0 = unknown."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total > 0:
        frac = min(1.0, done / total)
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = f"ETA {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
        return (f"{label} [{bar}] {done}/{total} {frac:4.0%} {rate:,.0f}/s {eta}").rstrip()
    return f"{label} {done} {rate:,.0f}/s"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class ProgressBar:
    """A progress line on ``out``: redrawn in place (``\\r``) on a terminal, else a plain
    line every ``every_s`` seconds (logs and CI stay readable)."""

    label: str
    total: int
    out: TextIO
    tty: bool | None = None
    every_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    _start: float = field(default=0.0, init=False)
    _shown: float = field(default=-1e9, init=False)
    _shown_done: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.out.isatty()
        self._start = self.clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._shown >= (0.1 if self.tty else self.every_s):
            self._show(now)

    def _show(self, now: float, end: str = "") -> None:
        self._shown, self._shown_done = now, self.done
        text = render_progress(self.label, self.done, self.total, now - self._start)
        if self.tty:
            self.out.write(f"\r\033[K{text}{end}")
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty or self._shown_done != self.done:  # a plain line only if it says more
            self._show(self.clock(), end="\n" if self.tty else "")


async def paced(items: Sequence[T], label: str, rate: float, err: TextIO) -> AsyncIterator[T]:
    """Each of ``items`` in turn, at most ``rate`` a second (a :class:`TokenBucket`), with a
    :class:`ProgressBar` on ``err`` that advances once the caller is done with each."""
    bucket = TokenBucket(rate)
    bar = ProgressBar(label, len(items), err)
    try:
        for item in items:
            await bucket.take()
            yield item
            bar.advance()
    finally:
        bar.close()
