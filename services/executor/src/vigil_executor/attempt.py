"""One attempt of one task on this node: claim, run, record, ack — in that order.

- **Claim** the task as attempt n+1 (:mod:`vigil_executor.claim`), and keep its lease
  while the attempt runs (:mod:`vigil_executor.lease`).
- **Run** the agent (:mod:`vigil_executor.agentrun`): create its container, restoring
  the workspace from the task's checkpoint if an earlier attempt left one
  (:mod:`vigil_executor.restore`), start it, watch it, and judge its exit.
- **Checkpoint** on the agent's request, periodically if configured, and on drain
  (:mod:`vigil_executor.checkpointing`).
- **Record** the outcome, or the retry, by compare-and-set, then ack the work message; or
  **hand the task back** without spending an attempt (:mod:`vigil_executor.outcome`).

This module is the order of those steps and what happens when one fails. The steps share
the attempt's :class:`~vigil_executor.hold.Hold`, and see the executor only through an
:class:`~vigil_executor.context.AttemptContext`.
"""

from __future__ import annotations

import contextlib

import msgspec
import structlog
from nats.aio.msg import Msg
from structlog.contextvars import bound_contextvars

from vigil import codec
from vigil.errors import NatsUnavailable
from vigil.messages import WorkItem
from vigil_executor.agentio import clip
from vigil_executor.agentrun import RUNTIME_RETRY_DELAY_S, AgentRun
from vigil_executor.checkpointing import Checkpointing
from vigil_executor.claim import (
    CancelUnrun,
    Claimed,
    CrashLoop,
    HandBack,
    LeaseLost,
    Poison,
    Terminal,
    claim,
)
from vigil_executor.confess import AgentConfessions
from vigil_executor.context import AttemptContext
from vigil_executor.hold import Hold
from vigil_executor.lease import Lease
from vigil_executor.outcome import (
    cancelled_unrun,
    dead,
    finished_again,
    hand_back,
    may_hand_back,
    record,
)

log = structlog.get_logger("vigil.executor")

LABELS_RETRY_DELAY_S = 0.5


class Attempt:
    def __init__(self, ctx: AttemptContext, msg: Msg) -> None:
        self.ctx = ctx
        self.h = h = Hold(ctx, msg)
        self.lease = Lease(h)  # counts from the delivery
        self.agent = AgentRun(h, self.lease, Checkpointing(h), AgentConfessions(h))

    @property
    def work(self) -> WorkItem | None:
        """The work item, once decoded."""
        return self.h.work

    # entry point ----------------------------------------------------------------------------
    async def run(self) -> None:
        h = self.h
        try:
            work = h.work = codec.work_decoder.decode(h.msg.data)
        except msgspec.DecodeError as exc:
            await self._poison(f"undecodable work item: {exc}")
            return
        h.sink.tenant = work.tenant
        with bound_contextvars(task_id=work.task_id, executor=self.ctx.settings.node_id):
            missing = _missing_labels(work.spec.node_labels, self.ctx.settings.label_map)
            if missing:
                # Not for this node: back to the pool at once (no attempt, no state
                # change); a node with the labels takes it. The scheduler only queues
                # tasks some live node can run.
                log.info("labels_mismatch", missing=missing)
                with contextlib.suppress(Exception):
                    await h.msg.nak(delay=LABELS_RETRY_DELAY_S)
                return
            try:
                await self._run()
            except LeaseLost as exc:
                self.ctx.metrics.leases_lost.inc()
                log.warning("lease_lost", reason=str(exc))
                await self.lease.confess_lost(str(exc))
            except HandBack as exc:
                await hand_back(h, exc)
            except NatsUnavailable as exc:
                # We could not record what happened; the lease will lapse and another node
                # (or this one) retries the task. Nothing is acked, nothing is lost.
                log.error("nats_unavailable_mid_task", error=str(exc))
            except Exception as exc:
                # A bug of ours must not lose the task, nor be charged to the agent or the
                # node: hand it back as the attempt's record (not left `running`, which
                # the next delivery would count as a lost node) for another try (the
                # consumer's max deliveries bound the loop) and say so loudly.
                log.exception("attempt_failed_unexpectedly")
                with contextlib.suppress(Exception):
                    await h.confess("critical", "executor_bug",
                                    f"executor failed handling the task: {exc!r}")
                if await may_hand_back(h):
                    with contextlib.suppress(Exception):
                        await hand_back(h, HandBack(
                            f"executor error: {clip(repr(exc), 300)}", RUNTIME_RETRY_DELAY_S,
                            kind="executor error"))
                else:
                    # A newer delivery holds the task: our nak would redeliver the message
                    # under its feet (ADR 7). Its lease is not ours to touch; do nothing.
                    log.warning("not_handing_back", reason="a newer attempt holds the task")
            finally:
                for task in h.background:
                    task.cancel()
                h.sink.cancel()
                await self.cleanup()

    def stop(self, reason: str) -> None:
        """Ask this attempt to hand its task back (executor draining)."""
        self.h.stop(reason)

    def cancel(self) -> None:
        """The task was cancelled: stop the agent (grace, then kill), record ``cancelled``."""
        self.h.cancel()

    # steps ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        h = self.h
        if not await self._claim():
            return
        assert h.state is not None
        attempt = h.state.attempt
        with bound_contextvars(attempt=attempt):
            self.lease.start()
            retry_in: float | None = None
            try:
                outcome = await self.agent.execute(attempt)
                if h.env is not None:
                    outcome = await h.env.commit(outcome, h.container,
                                                 h.msg.metadata.num_delivered)
                # The lease is kept until the ack: recording can take a while if NATS is
                # slow, and a lapse now would hand a finished task to someone else.
                retry_in = await record(h, outcome)
                if h.env is not None and retry_in is None:
                    await h.env.release()  # the task ended: the next one may take it
            finally:
                await self.lease.end()
            if retry_in is not None:
                # Only now that the heartbeat has stopped: an in-progress ack sent after
                # the nak would reset the message's timer to the ack wait.
                with contextlib.suppress(Exception):
                    await h.msg.nak(delay=retry_in)
                log.info("task_retrying", delay_s=round(retry_in, 3))

    async def _claim(self) -> bool:
        """Move the task to ``running`` as attempt n+1 (see claim.claim), or carry out
        what else its delivery came to; False when there is nothing to run."""
        h = self.h
        assert h.work is not None
        decided = await claim(self.ctx.store, self.ctx.settings, h.msg, h.work, h.confess)
        if isinstance(decided, Claimed):
            h.state, h.revision = decided.state, decided.revision
            self.ctx.metrics.tasks.labels("running").inc()
            return True
        if isinstance(decided, Poison):
            await self._poison(decided.why)
        elif isinstance(decided, Terminal):
            await finished_again(h, decided.state)
            await h.msg.ack()
        elif isinstance(decided, CancelUnrun):
            await cancelled_unrun(h, decided.state, decided.revision)
        elif isinstance(decided, CrashLoop):
            await dead(h, decided.state, decided.revision)
        return False

    async def _poison(self, why: str) -> None:
        """A work message that can never run: terminate it (no redelivery) and confess."""
        h = self.h
        log.error("poison_work_item", error=why)
        with contextlib.suppress(Exception):
            await h.confess("error", "poison_work_item", why,
                            confession_id=f"executor-poison-{h.msg.metadata.sequence.stream}")
        with contextlib.suppress(Exception):
            await h.msg.term()

    async def cleanup(self) -> None:
        """However the attempt ended: its container and its volume go (the workspace
        lives on in the checkpoint, not in this node's volume). Needs only the runtime,
        not NATS. Idempotent: a drain that ran out of time calls it too (Executor._drain)."""
        h = self.h
        if h.egress is not None:
            await h.egress.close()
        if h.container is not None:
            with contextlib.suppress(Exception):
                await h.container.remove()
        if h.volume is not None:
            with contextlib.suppress(Exception):
                await self.ctx.runtime.remove_volume(h.volume)
        if h.control is not None:
            self.ctx.remove_control_dir(h.control)
        h.secrets.remove()


def _missing_labels(needed: dict[str, str], have: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in needed.items() if have.get(k) != v}
