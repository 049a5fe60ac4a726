"""Dispatch: release queued tasks to executors as capacity frees up, fairly.

Admitted tasks wait in ``VIGIL_QUEUE`` on ``vigil.queue.<pool>.<tenant>.<priority>``. The
dispatcher — one scheduler at a time, holding the ``dispatcher`` lease — repeatedly:

1. reads the queue's per-subject depths (one stream-info call: the backlog never has to
   fit in memory; 100,000 queued tasks cost the scheduler a few counters);
2. per pool, computes the free capacity: the slots of live executors (``vigil-executors``)
   minus the work items already released and not finished (the pool consumer's pending
   and unacknowledged counts);
3. plans that many picks with :func:`vigil_scheduler.fairness.plan` (round-robin across
   tenants, priority within a tenant, per-tenant running limits);
4. for each pick takes the head entry of that subject (a direct get), moves the task
   ``queued`` -> ``scheduled`` by compare-and-set, publishes the ``scheduled`` event and
   the work item, and deletes the entry.

Every step is idempotent: a dispatcher killed between any two of them leaves an entry
that the next one finishes (the work item's message id deduplicates a re-publish; a task
no longer ``queued`` just has its stale entry deleted). Two dispatchers at once (a paused
leader) can only over-fill capacity briefly, never schedule a task twice.

When a pool has no backlog, admissions skip the queue while the pool has free capacity
(:meth:`Dispatcher.fast_slot`): an idle platform pays no extra hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from vigil import codec, subjects, transitions
from vigil.errors import NatsUnavailable
from vigil.jetstream import TaskStore, delete_msg, publish, publish_event, retrying
from vigil.messages import Confession, TaskState, WorkItem, utcnow
from vigil_scheduler.fairness import plan
from vigil_scheduler.fleet import Fleet
from vigil_scheduler.lease import Lease

log = structlog.get_logger("vigil.scheduler")

UNSERVABLE_CONFESS_EVERY_S = 600.0
# Executors advertise every 2 s: a task released less than this ago may not be in any
# advert yet, so it is counted from the dispatcher's own memory.
ADVERT_LAG_S = 3.0
# Entries waiting for labels nobody has, skipped over per take before giving up.
MAX_SKIPPED = 1_000
# Entries looked at when a tenant at its queued limit might be held there by stale ones.
SWEEP_BUDGET = 500
SWEEP_EVERY_S = 10.0


@dataclass
class Backlog:
    """Queue depths: pool -> tenant -> priority -> entries."""

    depths: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    read_at: float = 0.0

    @classmethod
    def parse(cls, counts: dict[str, int]) -> Backlog:
        depths: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
        for subject, n in counts.items():
            parts = subject.split(".")
            if len(parts) != 5 or not parts[4].isdigit() or n <= 0:
                continue
            depths[parts[2]][parts[3]][int(parts[4])] = n
        return cls(depths={p: {t: dict(v) for t, v in ts.items()} for p, ts in depths.items()},
                   read_at=time.monotonic())

    def pool_depth(self, pool: str) -> int:
        return sum(n for by_prio in self.depths.get(pool, {}).values()
                   for n in by_prio.values())

    def tenant_depth(self, tenant: str) -> int:
        return sum(n for tenants in self.depths.values()
                   for n in tenants.get(tenant, {}).values())


class Dispatcher:
    def __init__(self, nc: NATS, js: JetStreamContext, store: TaskStore, fleet: Fleet,
                 lease: Lease, *,
                 max_running: Callable[[str], int], confess: Callable[[Confession],
                                                                      Awaitable[None]],
                 count: Callable[[int], None], scheduled: Callable[[], None] = lambda: None,
                 interval_s: float = 0.05) -> None:
        self.nc, self.js, self.store, self.fleet, self.lease = nc, js, store, fleet, lease
        self.max_running = max_running
        self._confess = confess
        self._count = count
        self._scheduled = scheduled  # once per queued -> scheduled, whichever path took it
        self.interval_s = interval_s
        self.backlog = Backlog()
        self.wake = asyncio.Event()
        self._rotation: dict[str, str | None] = {}
        self._fast: dict[str, int] = {}  # pool -> slots the fast path may still take
        self._fast_at = 0.0
        self._unservable_said: dict[str, float] = {}
        # Releases (time, tenant, pool) not yet visible in the executors' adverts.
        self._released: deque[tuple[float, str, str]] = deque()
        self._swept: dict[str, float] = {}

    # the backlog and capacity --------------------------------------------------------------
    async def refresh(self) -> Backlog:
        try:
            info = await self.js.stream_info(subjects.STREAM_QUEUE,
                                             subjects_filter=f"{subjects.QUEUE}.>")
        except Exception as exc:
            raise NatsUnavailable(f"cannot read the queue's depths: {exc}") from exc
        self.backlog = Backlog.parse(dict(info.state.subjects or {}))
        return self.backlog

    async def capacity(self, pool: str) -> int:
        """Free slots in ``pool``: advertised slots minus work items nobody has pulled yet
        minus what holds a slot. Two upper bounds of the latter, the lower one wins: the
        consumer's unacknowledged messages (exact at once, but it also counts tasks
        waiting out a retry backoff, which hold no slot and must not stall the queue), and
        the executors' adverts plus this dispatcher's releases since (no backoffs, but
        adverts are up to two seconds old)."""
        slots = self.fleet.slots(pool)
        if slots == 0:
            return 0

        async def info() -> tuple[int, int]:
            try:
                got = await self.js.consumer_info(subjects.STREAM_WORK,
                                                  subjects.consumer_executor(pool))
            except NotFoundError:
                return 0, 0
            return int(got.num_pending or 0), int(got.num_ack_pending or 0)

        try:
            unpulled, unacked = await retrying(f"capacity of pool {pool}", info)
        except Exception as exc:
            raise NatsUnavailable(f"cannot read pool {pool}'s work queue: {exc}") from exc
        self._expire_released()
        recent = sum(1 for _, _, p in self._released if p == pool)
        return slots - unpulled - min(unacked, self.fleet.running(pool) + recent)

    def running(self) -> Counter[str]:
        """Tasks per tenant released and not finished, as far as this scheduler knows: what
        the executors advertise running, plus what it released since their adverts (which
        are up to ADVERT_LAG_S old). Counting a task twice for a moment errs on the side
        of the limit."""
        self._expire_released()
        counts = self.fleet.running_by_tenant()
        counts.update(tenant for _, tenant, _ in self._released)
        return counts

    def _expire_released(self) -> None:
        now = time.monotonic()
        while self._released and now - self._released[0][0] > ADVERT_LAG_S:
            self._released.popleft()

    async def fast_slot(self, pool: str, tenant: str) -> bool:
        """May an admission skip the queue? Only with no backlog, a free slot, and the
        tenant under its running limit."""
        if self.running()[tenant] >= self.max_running(tenant):
            return False
        now = time.monotonic()
        if now - self._fast_at > 0.25 or now - self.backlog.read_at > 0.25:
            await self.refresh()
            self._fast = {}
            self._fast_at = now
        if self.backlog.pool_depth(pool) > 0:
            return False
        if pool not in self._fast:
            self._fast[pool] = await self.capacity(pool)
        if self._fast[pool] <= 0 or self.running()[tenant] >= self.max_running(tenant):
            return False
        self._fast[pool] -= 1
        # Reserved now, before any await: concurrent admissions see it at once.
        self._released.append((time.monotonic(), tenant, pool))
        return True

    # the loop ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            dispatched = 0
            try:
                if await self.lease.hold():
                    dispatched = await self.tick()
            except NatsUnavailable as exc:
                log.warning("dispatch_retry", error=str(exc))
            except Exception:
                log.exception("dispatch_failed")
            if dispatched:
                continue  # more may be ready; capacity is re-read each round
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_any(stop), self.interval_s * 5)
        await self.lease.release()

    def on_slot_freed(self, tenant: str | None = None) -> None:
        """A task finished somewhere: capacity may have freed up; look now. Its tenant's
        oldest reservation goes too (the task it stood for is likely this one, and at
        worst another of the tenant's that the adverts will count)."""
        if tenant is not None:
            for i, (_, t, _) in enumerate(self._released):
                if t == tenant:
                    del self._released[i]
                    break
        if self.backlog.depths:
            self.wake.set()

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waits = {asyncio.ensure_future(e.wait()) for e in (self.wake, stop, self.fleet.changed)}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            self.fleet.changed.clear()

    async def tick(self) -> int:
        backlog = await self.refresh()
        running = self.running()
        total = 0
        for pool, depths in backlog.depths.items():
            if not self.fleet.serves(pool, {}):
                await self._unservable(pool, backlog.pool_depth(pool))
                continue
            cap = await self.capacity(pool)
            if cap <= 0:
                continue
            limits = {t: self.max_running(t) for t in depths}
            picks, self._rotation[pool] = plan(depths, cap, running, limits,
                                               self._rotation.get(pool))
            now = time.monotonic()
            for p in picks:  # reserved before any await, like the fast path's
                self._released.extend([(now, p.tenant, pool)] * p.count)
                running[p.tenant] += p.count
            results = await asyncio.gather(*(
                self._take(subjects.queue(pool, p.tenant, p.priority), p.count)
                for p in picks))
            total += sum(results)
        if total:
            self._count(total)
        return total

    async def _take(self, subject: str, count: int) -> int:
        """Dispatch the first ``count`` entries of ``subject``: read them in order, then
        release them together (one round's picks start together anyway). Deletions
        overlap too: an entry left by a crash after its task was released is harmless,
        the next take finds the task ``scheduled`` and just deletes it."""
        entries: list[tuple[int, bytes]] = []
        seq, skipped = 1, 0
        while len(entries) < count and skipped < MAX_SKIPPED:
            try:
                entry = await self.js.get_msg(subjects.STREAM_QUEUE, seq=seq, subject=subject,
                                              next=True)
            except NotFoundError:
                break
            assert entry.seq is not None
            seq = entry.seq + 1
            if self._waits_for_placement(entry.data or b""):
                skipped += 1  # stays queued; the tasks behind it go on
                continue
            entries.append((entry.seq, entry.data or b""))
        results = await asyncio.gather(*(self.dispatch_entry(data) for _, data in entries),
                                       return_exceptions=True)
        await asyncio.gather(*(delete_msg(self.nc, subjects.STREAM_QUEUE, n)
                               for (n, _), r in zip(entries, results, strict=True)
                               if not isinstance(r, BaseException)),
                             return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r  # the entry stays; the next round tries it again
        return sum(1 for r in results if r is True)

    async def sweep(self, tenant: str, budget: int = SWEEP_BUDGET) -> int:
        """Delete up to ``budget`` entries of ``tenant``'s backlog whose task no longer
        waits (cancelled or timed out while queued): they would count against its
        ``max_queued`` until the dispatcher reached them. Returns how many went. At most
        once per tenant every SWEEP_EVERY_S: a tenant hammering its limit must not make
        every refusal a scan."""
        now = time.monotonic()
        if now - self._swept.get(tenant, -1e9) < SWEEP_EVERY_S:
            return 0
        self._swept[tenant] = now
        removed = 0
        for pool, tenants in self.backlog.depths.items():
            for prio in tenants.get(tenant, {}):
                subject, seq = subjects.queue(pool, tenant, prio), 1
                while budget > 0:
                    try:
                        entry = await self.js.get_msg(subjects.STREAM_QUEUE, seq=seq,
                                                      subject=subject, next=True)
                    except NotFoundError:
                        break
                    assert entry.seq is not None
                    seq, budget = entry.seq + 1, budget - 1
                    try:
                        queued = codec.work_decoder.decode(entry.data or b"")
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    got = await self.store.get(queued.tenant, queued.task_id)
                    if got is None or got[0].status != "queued":
                        await delete_msg(self.nc, subjects.STREAM_QUEUE, entry.seq)
                        removed += 1
        if removed:
            log.info("backlog_swept", tenant=tenant, removed=removed)
            await self.refresh()
        return removed

    def _waits_for_placement(self, data: bytes) -> bool:
        """An entry needing executor labels, or an image, that no live executor of its
        pool has."""
        try:
            work = codec.work_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False  # dispatch_entry says so and drops it
        spec = work.spec
        # Released only while a matching executor has a free slot: otherwise executors
        # without the labels would hand it back and forth, each time a delivery, until
        # the server's max deliveries buried a task that never ran.
        if spec.node_labels and not self.fleet.serves(spec.pool, spec.node_labels,
                                                      free=True):
            return True
        # Nobody has the image: every executor would hand it back, each time a delivery.
        return not self.fleet.serves(spec.pool, spec.node_labels, image=spec.image)

    async def dispatch_entry(self, data: bytes) -> bool:
        try:
            work = codec.work_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad_queue_entry", error=str(exc))
            return False
        return await self.schedule(work)

    async def schedule(self, work: WorkItem) -> bool:
        """``queued`` -> ``scheduled``, then the event and the work item. Idempotent."""
        if work.revision > 0:
            # The entry names the revision of the untouched queued state it was queued
            # with: one compare-and-set, no read. Anything since (a cancel, a timeout, a
            # redelivered admission) moved the revision, and the read path below decides.
            step = transitions.schedule(queued_state_of(work), utcnow())
            new_rev = await self.store.cas(step.state, work.revision)
            if new_rev is not None:
                self._scheduled()
                await self._release(step.state, work, new_rev)
                return True
        for _ in range(10):
            got = await self.store.get(work.tenant, work.task_id)
            if got is None:
                return False
            state, rev = got
            if state.status == "queued":
                step = transitions.schedule(state, utcnow())
                new_rev = await self.store.cas(step.state, rev)
                if new_rev is None:
                    continue  # cancelled or timed out meanwhile: look again
                self._scheduled()
                await self._release(step.state, work, new_rev)
                return True
            if scheduled_unreleased(state):
                # A dispatcher died between the state write and the work item.
                await self._release(state, work, rev)
                return True
            return False  # cancelled, timed out, or long since running
        raise NatsUnavailable(f"task {work.task_id} kept changing while dispatching it")

    async def _release(self, state: TaskState, work: WorkItem, rev: int) -> None:
        # The event goes out first on this connection, so the server stores it before the
        # work item: no `started` can precede `scheduled` in the timeline.
        event = asyncio.ensure_future(publish_event(
            self.js, state.tenant, transitions.scheduled_event(state)))
        await asyncio.sleep(0)
        await publish(self.js, subjects.work(work.spec.pool),
                      codec.encode(msgspec.structs.replace(work, revision=rev)),
                      work_msg_id(state))
        await event

    async def _unservable(self, pool: str, depth: int) -> None:
        if not self.fleet.settled:
            return
        now = time.monotonic()
        if now - self._unservable_said.get(pool, -1e9) < UNSERVABLE_CONFESS_EVERY_S:
            return
        self._unservable_said[pool] = now
        log.warning("pool_unservable", pool=pool, queued=depth)
        try:
            await self._confess(Confession(
                id=f"scheduler-unservable-pool-{pool}-{int(time.time() // 600)}",
                summary=f"pool {pool!r} has queued tasks and no live executor",
                severity="error", category="unservable",
                detail=f"{depth} tasks wait in pool {pool!r}; no executor of that pool has "
                "advertised itself in vigil-executors",
                hint=f"start an executor with VIGIL_POOL={pool}, or cancel the tasks",
                data={"pool": pool, "queued": depth},
            ))
        except Exception as exc:  # said again in ten minutes; the log has it meanwhile
            log.warning("confession_failed", error=str(exc))
            self._unservable_said.pop(pool, None)


def work_msg_id(state: TaskState) -> str:
    """The work item's message id: one per release (a requeued task is released anew;
    the same id would be dropped as a duplicate within the work stream's window)."""
    return _msg_id(state, "work")


def queue_msg_id(state: TaskState) -> str:
    """The queue entry's message id: one per admission, and one per requeue."""
    return _msg_id(state, "queue")


def _msg_id(state: TaskState, what: str) -> str:
    base = f"{state.key}:{what}:{state.submit_seq}"
    return f"{base}:r{state.requeued}" if state.requeued else base


def scheduled_unreleased(state: TaskState) -> bool:
    return (state.status == "scheduled" and state.attempt == 0 and state.work_seq == 0
            and state.redriven == 0)


def queued_state_of(work: WorkItem) -> TaskState:
    """The ``queued`` state admission writes for ``work``, field for field."""
    return TaskState(id=work.task_id, tenant=work.tenant, status="queued",
                     created_at=work.submitted_at, updated_at=work.submitted_at,
                     spec=work.spec, submit_seq=work.submit_seq,
                     spec_digest=work.spec_digest)
