"""The scheduler: consumes ``vigil.submit.>``, records tasks, publishes work.

Per submission, in order, each step idempotent so that a redelivery (after a crash
between steps) completes the work instead of duplicating it:

1. validate and assign the id (:mod:`vigil_scheduler.admission`);
2. create the task in ``vigil-tasks`` as ``queued`` (create-if-absent: a second submission
   of the same id is a duplicate and runs nothing);
3. move it to ``scheduled`` (compare-and-set), then publish the work item with
   ``Nats-Msg-Id = <id>:work:<submit_seq>`` so a re-publish is deduplicated;
4. ack the submission only once all of that, and the ``accepted``/``scheduled`` events, are
   durable. A transient NATS failure naks with a delay; an invalid submission is recorded
   (failed state + confession) and terminated, never redelivered forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError
from structlog.contextvars import bound_contextvars

from vigil import codec, subjects, topology, transitions
from vigil.consume import PullConsumer
from vigil.environments import EnvironmentStore
from vigil.errors import NatsUnavailable
from vigil.jetstream import TaskStore, publish, publish_confession, publish_event
from vigil.lifecycle import Late, Lifecycle
from vigil.messages import Confession, ConfessionEvent, Event, TaskState, WorkItem, utcnow
from vigil_scheduler import environments
from vigil_scheduler.admission import (
    Admit,
    Reject,
    admit,
    failed_state,
    tenant_of,
    unreadable,
)
from vigil_scheduler.control import Control
from vigil_scheduler.deadletter import DeadLetters
from vigil_scheduler.dispatch import (
    Dispatcher,
    queue_msg_id,
    queued_state_of,
    scheduled_unreleased,
)
from vigil_scheduler.fleet import Fleet
from vigil_scheduler.lease import Lease
from vigil_scheduler.metrics import Metrics
from vigil_scheduler.settings import SchedulerSettings
from vigil_scheduler.timers import Timer, Timers, later, set_timer

log = structlog.get_logger("vigil.scheduler")

RETRY_DELAY_S = 2.0
REFUSED_DELAY_S = 30.0
POISON_AFTER = 5  # deliveries of a submission that keeps crashing the scheduler
UNSERVABLE_CONFESSIONS = 5  # per pool and window; the rest only set their state
UNSERVABLE_WINDOW_S = 600.0


class Scheduler:
    # Set at start, once connected.
    _store = Late[TaskStore]()
    _environments = Late[EnvironmentStore]()
    _fleet = Late[Fleet]()
    _dispatcher = Late[Dispatcher]()

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.node = settings.node_id
        self._life = Lifecycle("scheduler", settings, self.metrics.registry,
                               detail=lambda: {"inflight": len(self._inflight)})
        self._stop = self._life.stopping
        self.ready = self._life.ready
        self._consumer: PullConsumer | None = None
        self._unservable_told: dict[str, tuple[float, int]] = {}
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def _js(self) -> JetStreamContext:
        return self._life.conn.js

    # lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        s, life = self.settings, self._life
        async with life:
            nc, js = await life.connect()
            await topology.ensure_consumer(js, subjects.STREAM_SUBMIT,
                                           topology.scheduler_consumer())
            self._store = await TaskStore.open(js)
            self._environments = await EnvironmentStore.open(js)
            consumer = self._consumer = PullConsumer(
                nc, subjects.STREAM_SUBMIT, subjects.CONSUMER_SCHEDULER,
                capacity=s.batch, max_batch=s.batch)
            life.on_close(consumer.stop)
            # Let admissions in progress finish: each is a few JetStream round trips.
            life.on_close_wait(self._inflight, 10)
            await consumer.start()
            life.on_reconnect(consumer.reset)
            await topology.ensure_consumer(js, subjects.STREAM_CONTROL,
                                           topology.control_consumer())
            await topology.ensure_consumer(js, subjects.STREAM_TIMERS, topology.timers_consumer())
            control = Control(nc, js, self._store, self._confess, self._count_control)
            life.on_reconnect(control.reset)
            self._fleet = Fleet(js, settle_s=s.unservable_after_s)
            await self._fleet.start()
            self._dispatcher = dispatcher = Dispatcher(
                nc, js, self._store, self._fleet, Lease(js, "dispatcher", self.node),
                max_running=lambda t: s.limits_for(t).max_running, confess=self._confess,
                count=self.metrics.dispatched.inc, scheduled=self._count_scheduled,
                interval_s=s.dispatch_interval_s)
            await dispatcher.refresh()

            # Finished tasks free slots: wake the dispatcher instead of waiting for its poll.
            async def slot_freed(msg: Msg) -> None:
                tenant = None
                if msg.subject.endswith(".finished"):
                    with contextlib.suppress(Exception):
                        tenant = codec.any_decoder.decode(msg.data).get("tenant")
                dispatcher.on_slot_freed(tenant if isinstance(tenant, str) else None)

            await nc.subscribe(subjects.events_of_kind("finished"), cb=slot_freed)
            await nc.subscribe(subjects.events_of_kind("retrying"), cb=slot_freed)
            timers = Timers(nc, self._on_timer)
            life.on_reconnect(timers.reset)
            stop = self._stop
            background = {asyncio.create_task(loop) for loop in (
                DeadLetters(nc, js, self._store, self.node).run(stop), control.run(stop),
                timers.run(stop), dispatcher.run(stop))}
            life.started(http_port=life.http_port, batch=s.batch)
            await self._loop(consumer)
            await asyncio.wait(background, timeout=10)
            await self._fleet.stop()

    async def shutdown(self) -> None:
        await self._life.shutdown()

    def _count_control(self, what: str) -> None:
        verb, _, outcome = what.partition(":")
        self.metrics.control.labels(verb, outcome).inc()
        if what == "redrive:redriven":
            self._count_scheduled()  # a redriven task is scheduled again

    def _count_scheduled(self) -> None:
        self.metrics.tasks.labels("scheduled").inc()

    @property
    def http_port(self) -> int:
        return self._life.http_port

    # loop ----------------------------------------------------------------------------------
    async def _loop(self, consumer: PullConsumer) -> None:
        async for msg in consumer.until(self._stop):
            self._spawn(msg)

    def _spawn(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._consumer is not None:
            self._consumer.release(1)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("handler_crashed", error=repr(exc))

    # one submission ------------------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        meta = msg.metadata
        seq = meta.sequence.stream
        msg_id = msg.headers.get(subjects.MSG_ID) if msg.headers else None
        with bound_contextvars(submit_seq=seq, subject=msg.subject):
            try:
                found = await self._environments_of(msg.subject, msg.data)
                try:
                    decision: Admit | Reject = admit(msg.data, msg.subject, msg_id, seq,
                                                     utcnow(), self.settings, found)
                except Exception as exc:
                    log.exception("admission_crashed")
                    decision = unreadable(msg.subject, msg_id, seq, exc)
                if isinstance(decision, Reject):
                    await self._reject(decision, seq, msg_id)
                    await msg.term()
                    self.metrics.submissions.labels("rejected").inc()
                    return
                with bound_contextvars(task_id=decision.state.id, tenant=decision.state.tenant):
                    outcome = await self._schedule(decision)
                await msg.ack()
                self.metrics.submissions.labels(outcome).inc()
                if outcome == "scheduled":
                    self.metrics.admission_seconds.observe(time.perf_counter() - started)
            except NatsUnavailable as exc:
                log.warning("submission_retry", error=str(exc), delivered=meta.num_delivered)
                self.metrics.submissions.labels("retried").inc()
                with contextlib.suppress(Exception):
                    await msg.nak(delay=RETRY_DELAY_S)
            except APIError as exc:
                # JetStream refused a write for good (a full work stream, a value over
                # the bucket's limit): retrying the same message later may succeed (a
                # full stream drains); say so, and retry slowly.
                await self._refused(msg, seq, f"JetStream refused a write: {exc.description}")
            except Exception as exc:
                # A bug of ours, a NATS error type we did not map, or input we did not
                # foresee: try again a few times (a passing error heals), then give up on
                # it for good, recording the failure on the task if one was created.
                log.exception("submission_crashed", delivered=meta.num_delivered)
                why = f"scheduler failed on this submission: {exc!r}"
                poison = meta.num_delivered >= POISON_AFTER
                if poison:
                    with contextlib.suppress(Exception):
                        await self._fail_created(seq, why)
                await self._refused(msg, seq, why, poison=poison)

    async def _refused(self, msg: Msg, seq: int, why: str, *, poison: bool = False) -> None:
        self.metrics.submissions.labels("poison" if poison else "refused").inc()
        with contextlib.suppress(Exception):
            await self._confess(Confession(
                id=f"scheduler-refused-{seq}-{msg.metadata.num_delivered}",
                summary=f"submission {seq} could not be admitted: {why}",
                severity="critical" if poison else "error", category="admission_failed",
                data={"submit_seq": seq, "delivered": msg.metadata.num_delivered},
            ))
        with contextlib.suppress(Exception):
            if poison:
                await msg.term()
            else:
                await msg.nak(delay=REFUSED_DELAY_S)

    async def _fail_created(self, seq: int, why: str) -> None:
        """A submission given up on: if it got as far as creating its task, the task must
        not sit ``queued`` forever. Find it by the id rule and fail it, with the reason."""
        stored = await self._js.get_msg(subjects.STREAM_SUBMIT, seq)
        msg_id = (stored.headers or {}).get(subjects.MSG_ID)
        found = await self._environments_of(stored.subject or "", stored.data or b"")
        decision = admit(stored.data or b"", stored.subject or "", msg_id, seq, utcnow(),
                         self.settings, found)
        if isinstance(decision, Reject):
            return
        got = await self._store.get_state(decision.state)
        if got is None or got[0].submit_seq != seq or got[0].terminal:
            return
        step = transitions.fail(got[0], utcnow(), why)
        if await self._store.cas(step.state, got[1]) is not None:
            for event in step.events:
                await self._event(step.state.tenant, event)
            log.error("task_failed_by_scheduler", task_id=step.state.id, error=why)

    async def _environments_of(self, subject: str, data: bytes) -> environments.Found:
        """The environment a submission names, read for admission (which is pure)."""
        return await environments.lookup(self._environments, tenant_of(subject), data)

    async def _schedule(self, admit_: Admit) -> str:
        state, work = admit_.state, admit_.work
        over = await self._over_quota(state.tenant)
        if over is not None:
            # Refused at the moment of admission: one time for created and finished.
            state = transitions.refuse(state, over[1], limit=over[0]).state
        rev = await self._store.create(state)
        if rev is None:
            existing = await self._store.get_state(state)
            if existing is None:
                # Deleted between our create and get (TTL expiry): treat as new next time.
                raise NatsUnavailable(f"task {state.id} vanished while admitting; retrying")
            current, rev = existing
            if takes_over(state, current):
                # Refused earlier (a tenant limit, an invalid spec): a later submission of
                # the same id is a retry, not a duplicate. Take the id over.
                log.info("submission_takes_over", refused_seq=current.submit_seq,
                         refused=current.error)
                new_rev = await self._store.cas(state, rev)
                if new_rev is None:
                    raise NatsUnavailable(f"task {state.id} changed while re-admitting it")
                current, rev = state, new_rev
            if current.submit_seq != state.submit_seq:
                await self._on_duplicate(state, current)
                return "duplicate"
            # Our own earlier attempt at this submission got partway: carry on from there
            # (with its times: this delivery's admission stamped new ones).
            state = current
            work = msgspec.structs.replace(work, submitted_at=current.created_at)
            log.info("submission_resumed", status=state.status)
        if state.rejected_by is not None:
            await self._rejected(state)
            return "rejected"
        # Events are sent before the work item on this one connection, so the server
        # stores them first: no executor's `started` can precede them in the timeline. A
        # resumed submission sends them again; their ids make that a no-op if stored.
        pending: list[Awaitable[object]] = [asyncio.ensure_future(self._event(
            state.tenant, transitions.accepted_event(state)))]
        await asyncio.sleep(0)  # the accepted event is sent before anything below
        try:
            if state.status == "queued":
                self.metrics.tasks.labels("queued").inc()
                return await self._enqueue(state, rev, work, admitting=True)
            if state.status == "scheduled" and state.attempt == 0:
                await self._dispatcher.schedule(work)
            return "scheduled"
        finally:
            await asyncio.gather(*pending)

    async def _enqueue(self, state: TaskState, rev: int, work: WorkItem, *,
                       admitting: bool, due: bool = False) -> str:
        """A ``queued`` task: wait for its time, or take a free slot, or join the queue."""
        spec = work.spec
        now = utcnow()
        if admitting and spec.queue_timeout_s:
            start = max(state.created_at, spec.not_before or state.created_at)
            await set_timer(self._js, "queue_timeout", state.tenant, state.id,
                            later(start, spec.queue_timeout_s))
        # (A fired start timer is due whatever this node's clock says about not_before:
        # setting the same timer again would be dropped as a duplicate.)
        if spec.not_before is not None and spec.not_before > now and not due:
            waiting = f"not before {spec.not_before.isoformat()}"
            if state.waiting != waiting:
                await self._store.cas(msgspec.structs.replace(state, waiting=waiting), rev)
            await set_timer(self._js, "start", state.tenant, state.id, spec.not_before)
            log.info("task_delayed", not_before=spec.not_before.isoformat())
            return "delayed"
        why = self._fleet.unservable(spec.pool, spec.node_labels, spec.image)
        servable = why is None
        if why is not None and self._fleet.settled:
            await self._unservable(state, rev, work, why)
        # With the revision of an untouched queued state, scheduling is one compare-and-set
        # (see Dispatcher.schedule).
        pristine = state == queued_state_of(work)
        entry = msgspec.structs.replace(work, revision=rev if pristine else 0)
        if (servable and not spec.node_labels
                and await self._dispatcher.fast_slot(spec.pool, state.tenant)
                and await self._dispatcher.schedule(entry)):
            log.info("task_scheduled", pool=spec.pool, path="direct")
            return "scheduled"
        await publish(self._js, subjects.queue(spec.pool, state.tenant, spec.priority),
                      codec.encode(entry), queue_msg_id(state))
        self._dispatcher.wake.set()
        log.info("task_queued", pool=spec.pool, priority=spec.priority)
        return "queued"

    async def _unservable(self, state: TaskState, rev: int, work: WorkItem, why: str) -> None:
        spec = work.spec
        if state.waiting != why:
            await self._store.cas(msgspec.structs.replace(state, waiting=why), rev)
        # Every such task says so in its state; only the first few per pool and ten
        # minutes also confess (they make one incident anyway): a backlog of 100,000
        # must not become 100,000 confessions. The dispatcher confesses per pool too.
        now = time.monotonic()
        since, told = self._unservable_told.get(spec.pool, (now, 0))
        if now - since > UNSERVABLE_WINDOW_S:
            since, told = now, 0
        self._unservable_told[spec.pool] = (since, told + 1)
        if told >= UNSERVABLE_CONFESSIONS:
            return
        data: dict[str, object] = {"pool": spec.pool, "node_labels": dict(spec.node_labels)}
        if spec.image is not None and self._fleet.serves(spec.pool, spec.node_labels):
            data["image"] = spec.image  # the image is what is missing (an incident each)
        await self._confess(Confession(
            id=f"scheduler-unservable-{state.key}", summary=f"task cannot run: {why}",
            severity="warning", category="unservable", task_id=state.id, tenant=state.tenant,
            hint="start an executor for that pool/labels, or build or load the image on "
            "one, or cancel the task; it waits queued (a queue_timeout_s would end it)",
            data=data,
        ))

    async def _over_quota(self, tenant: str) -> tuple[str, str] | None:
        limits = self.settings.limits_for(tenant)
        backlog = self._dispatcher.backlog
        if time.monotonic() - backlog.read_at > 0.5:
            backlog = await self._dispatcher.refresh()
        queued = backlog.tenant_depth(tenant)
        if queued >= limits.max_queued and await self._dispatcher.sweep(tenant):
            # Some of those were cancelled or timed out while queued: count again.
            queued = self._dispatcher.backlog.tenant_depth(tenant)
        if queued >= limits.max_queued:
            return "max_queued", (f"rejected: tenant {tenant!r} has {queued} queued tasks "
                                  f"(limit {limits.max_queued}); retry when some have started")
        return None

    async def _rejected(self, state: TaskState) -> None:
        assert state.error is not None
        self.metrics.tasks.labels("failed").inc()
        # Numbered by submission: a retried id may be refused again, and that is news.
        for event in transitions.refusal_events(state):
            await self._event(state.tenant, event, f"s{state.submit_seq}")
        await self._confess(Confession(
            id=f"scheduler-quota-{state.key}-{state.submit_seq}",
            summary=f"submission rejected: tenant {state.tenant!r} is over its "
            f"{state.rejected_by} limit", severity="warning", category="quota_rejected",
            detail=state.error, task_id=state.id, tenant=state.tenant,
            hint="wait for queued tasks to start, or raise VIGIL_TENANT_LIMITS",
        ))
        log.warning("submission_over_quota", limit=state.rejected_by)

    async def _on_timer(self, timer: Timer) -> None:
        if not timer.tenant:
            log.warning("timer_without_tenant", note="set before ids were per tenant; dropped")
            return
        got = await self._store.get(timer.tenant, timer.task_id)
        if got is None:
            return
        state, rev = got
        if timer.kind == "start":
            spec = state.spec
            if spec is None:
                return
            work = WorkItem(task_id=state.id, tenant=state.tenant, spec=spec,
                            spec_digest=state.spec_digest,
                            submitted_at=state.created_at, submit_seq=state.submit_seq)
            if scheduled_unreleased(state):
                # Fired before, and died between scheduling and the work item.
                await self._dispatcher.schedule(work)
                return
            if state.status != "queued":
                return
            if state.waiting is not None:
                cleared = msgspec.structs.replace(state, waiting=None)
                new_rev = await self._store.cas(cleared, rev)
                if new_rev is None:
                    raise NatsUnavailable("task changed while starting it; retrying")
                state, rev = cleared, new_rev
            await self._enqueue(state, rev, work, admitting=False, due=True)
        elif timer.kind == "queue_timeout":
            if state.status not in ("queued", "scheduled") or state.attempt > 0:
                return
            limit = state.spec.queue_timeout_s if state.spec else None
            error = (f"not started within its queue timeout of {limit:g}s"
                     + (f" ({state.waiting})" if state.waiting else ""))
            step = transitions.time_out(state, utcnow(), error)
            if await self._store.cas(step.state, rev) is None:
                raise NatsUnavailable("task changed while timing it out; retrying")
            self.metrics.tasks.labels("timed_out").inc()
            for event in step.events:
                await self._event(state.tenant, event)
            await self._confess(Confession(
                id=f"scheduler-queue-timeout-{state.key}", summary=f"task {state.id} timed out "
                "in the queue", severity="warning", category="queue_timeout", detail=error,
                task_id=state.id, tenant=state.tenant,
                hint="add executors to its pool, lower its priority's competition, or raise "
                "queue_timeout_s",
            ))
            log.warning("task_queue_timeout", error=error)

    async def _on_duplicate(self, state: TaskState, current: TaskState) -> None:
        # Ids are per tenant (the key holds the tenant): this is the same tenant's task.
        log.info("submission_duplicate", existing_seq=current.submit_seq, status=current.status)

    async def _reject(self, reject: Reject, seq: int, msg_id: str | None) -> None:
        """Record an invalid submission where its submitter will look for it."""
        now = utcnow()
        recorded_as: str | None = None
        state = failed_state(reject, seq, now)
        if state is not None:
            rev = await self._store.create(state)
            if rev is None:
                existing = await self._store.get_state(state)
                if existing is not None and existing[0].submit_seq == seq:
                    # Ours from an earlier delivery of this very submission: finish the
                    # job (the finished event may not have gone out before a crash).
                    state = existing[0]
                    rev = existing[1]
                elif existing is not None and takes_over(state, existing[0]):
                    # A second try that is still invalid: its error is the news now.
                    rev = await self._store.cas(state, existing[1])
                    if rev is None:
                        raise NatsUnavailable(f"task {state.id} changed while recording "
                                              "its rejection")
            if rev is not None:
                recorded_as = state.id
                self.metrics.tasks.labels("failed").inc()
                # Numbered by submission: each refused try of an id is its own news.
                for event in transitions.refusal_events(state):
                    await self._event(state.tenant, event, f"s{seq}")
        where = f"; recorded as task {recorded_as}" if recorded_as else ""
        log.warning("submission_rejected", error=reject.error, field=reject.field,
                    task_id=recorded_as)
        await self._confess(
            Confession(
                id=f"scheduler-invalid-{seq}",
                summary=f"invalid submission rejected{where}",
                severity="warning",
                category="invalid_submission",
                detail=reject.error,
                hint="fix the task spec and submit it again (the same id may be reused); "
                "see the error for the field",
                task_id=recorded_as,
                tenant=reject.tenant,
                data={"submit_seq": seq, "field": reject.field, "msg_id": msg_id},
            )
        )

    async def _event(self, tenant: str, event: Event, n: int | str | None = None) -> None:
        await publish_event(self._js, tenant, event, n)

    async def _confess(self, confession: Confession) -> None:
        full = msgspec.structs.replace(
            confession, source="scheduler", node=self.node, component="scheduler",
            time=confession.time or utcnow(),
        )
        await publish_confession(self._js, full)
        if full.task_id is not None and full.id is not None and full.tenant is not None:
            # On the task's own timeline too, so its view shows why it waits or failed.
            await publish_event(self._js, full.tenant, ConfessionEvent(
                task_id=full.task_id, attempt=full.attempt or 0, time=full.time or utcnow(),
                confession_id=full.id, summary=full.summary, severity=full.severity,
                source="scheduler"), full.id)



def takes_over(new: TaskState, current: TaskState) -> bool:
    """May submission ``new`` take the id of ``current``? Only a later submission of the
    same tenant, and only from a task refused at admission: that one is a retry. Anything
    that ran (or may yet run) keeps its id, and a resubmission is a duplicate."""
    return (current.tenant == new.tenant and current.submit_seq < new.submit_seq
            and current.refused_at_admission)
