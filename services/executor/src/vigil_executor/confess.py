"""The agent's confessions, and the ones its control lines earn it.

An agent confesses with ``::vigil::confess`` lines (see :mod:`vigil_executor.agentio`):
each is given its id and the attempt's identity, published, and put on the task's
timeline, within a rate limit (``VIGIL_MAX_CONFESSIONS`` at once, then
``VIGIL_CONFESSIONS_PER_MIN``). What the agent gets wrong (a malformed control line, a
confession too large, output past its limit) the executor confesses for it, and once the
output ends it says how many confessions the limit dropped. The executor's own
confessions about a task are :meth:`vigil_executor.hold.Hold.confess`.
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog

from vigil.messages import Confession, ConfessionEvent, utcnow
from vigil_executor.agentio import (
    ConfessionLimiter,
    ConfessionTooLarge,
    ControlError,
    OutputLimit,
    mib,
)
from vigil_executor.hold import Hold

log = structlog.get_logger("vigil.executor")


class AgentConfessions:
    """One attempt's agent confessions: the callbacks its AgentOutput is given."""

    def __init__(self, h: Hold) -> None:
        self._h = h
        settings = h.ctx.settings
        self.limiter = ConfessionLimiter(settings.max_confessions, settings.confessions_per_min)

    async def confession(self, confession: Confession) -> None:
        h, limiter = self._h, self.limiter
        assert h.state is not None
        if not limiter.allow():
            if limiter.dropped == 1:
                log.warning("confessions_rate_limited", burst=limiter.burst,
                            per_min=limiter.per_min)
            return  # counted; reported once when the agent's output ends (report_dropped)
        n = limiter.accepted
        cid = f"{h.state.key}-a{h.state.attempt}-c{n}"
        full = msgspec.structs.replace(
            confession, id=cid, source="agent", task_id=h.state.id, tenant=h.state.tenant,
            attempt=h.state.attempt, node=h.ctx.settings.node_id, component="agent",
            time=utcnow(),
        )
        await h.ctx.publish_confession(full)
        h.sink.emit(ConfessionEvent(
            task_id=h.state.id, attempt=h.state.attempt, time=utcnow(),
            confession_id=cid, summary=full.summary, severity=full.severity, source="agent",
        ))

    async def malformed(self, error: ControlError) -> None:
        h = self._h
        if isinstance(error, ConfessionTooLarge):
            # The agent's confession, refused: it spends a token like one that got through.
            if not self.limiter.allow():
                return
            assert h.state is not None
            await h.confess(
                "warning", "confession_too_large",
                f"agent {error}; it was refused (the line is kept as log)",
                hint="keep the summary short and the evidence in `detail` (cut at 8,000 "
                "characters with a marker); the whole line must fit the limit",
                confession_id=f"executor-{h.state.key}-a{h.state.attempt}-"
                f"c{self.limiter.accepted}-too-large")
            return
        await h.confess("warning", "malformed_control_line",
                        f"agent printed a malformed ::vigil:: control line: {error}",
                        hint="see the agent contract in the README; the line was kept as log")

    async def output_limit(self, limit: OutputLimit) -> None:
        """Once per attempt, when its output first goes past the limit. Bounded, and never
        fatal: the output must go on being read (the agent would block on a full pipe),
        and the marker line already says what the confession would."""
        try:
            await asyncio.wait_for(self._confess_output_limit(limit),
                                   self._h.ctx.settings.heartbeat_s)
        except Exception as exc:
            log.warning("output_limit_confession_failed", error=str(exc) or type(exc).__name__)

    async def _confess_output_limit(self, limit: OutputLimit) -> None:
        await self._h.confess(
            "warning", "output_limit",
            f"agent output passed its limit of {mib(limit.limit)}: the rest of this "
            "attempt's output is dropped (a marker line says how much); the agent keeps "
            "running",
            hint="raise resources.output_mb in the task spec (up to the tenant's maximum; "
            "VIGIL_OUTPUT_MB is the node's default), or have the agent write bulky output "
            "to its workspace")

    async def report_dropped(self) -> None:
        """Once per attempt, when its output ends: how many confessions the limit dropped."""
        dropped = self.limiter.report()
        if not dropped:
            return
        try:
            await self._h.confess(
                "warning", "confession_rate_limit",
                f"{dropped} confessions dropped by the rate limit (burst "
                f"{self.limiter.burst}, {self.limiter.per_min:g} a minute)",
                hint="an agent that confesses this often is likely looping; the first ones "
                "got through (VIGIL_MAX_CONFESSIONS, VIGIL_CONFESSIONS_PER_MIN)")
        except Exception as exc:  # the count is lost, the task's outcome must not be
            log.warning("dropped_confessions_report_failed", dropped=dropped, error=str(exc))
