"""The auditor: consumes ``vigil.issues.>`` durably, records every confession in
``vigil-confessions``, triages it into an incident in ``vigil-incidents``
(:mod:`vigil_auditor.triage`), and raises alerts on ``vigil.alerts.<severity>``, which
:mod:`vigil_auditor.notify` sends to webhooks.

**Once per confession id.** Confessions are handled one at a time, in stream order (the
consumer allows one unacknowledged message across all auditors, so a message held by one
that died comes back before anything newer). Each is first recorded under its id
(:func:`vigil_auditor.record.record_id`; create: the first write wins). A message whose id
was recorded from *another* stream message repeats that confession (published twice without
a ``Nats-Msg-Id``, or after the stream's duplicate window): it is acked and not triaged.
The *same* stream message again — a redelivery after a crash between recording and
triage, or a replay of the stream — is triaged: an incident remembers the newest stream
sequence it applied, so what was applied already counts nothing twice. So a replay of the
stream from the start rebuilds the same incidents, whether the records are kept or not.

**Each alert once.** An alert's id names its incident and the transition. Before an alert
is published, ``vigil-deliveries`` is asked whether it was published already (key
``published.<alert id>``), and afterwards that is recorded: a replay that rebuilds the
incidents publishes no alert again, however long after the alerts stream's duplicate
window. Alerts are published before the incident is written, so a crash in between loses
none (the redelivery publishes it again with the same ``Nats-Msg-Id``, then records it).

**Every message ends in a decision.** While a confession is handled, in-progress acks
every few seconds keep its lease (one NATS call alone may retry for 30 s, longer than the
consumer's ack wait): the server neither redelivers it meanwhile — to another auditor,
out of order — nor counts a delivery for it. Done → ack. NATS not answering → it is kept
and retried within this delivery until NATS answers, or nak'd at once if the auditor is
stopping. Anything else (a bug, an unreadable incident) → nak with a short backoff; the
``VIGIL_TRIAGE_ATTEMPTS``-th delivery gives up: the record notes the error, the auditor
confesses it (category ``triage_failed``) and acks — never dropped silently, never a
long stall of the confessions behind it. The consumer's max deliveries is unlimited, so
the server drops nothing: the auditor bounds the tries itself, and a confession delivered
:data:`STUCK_DELIVERIES` times without a decision (auditors dying on it) is given up too.
A given-up confession is retried by re-publishing it (the ``triage_failed`` confession's
hint says how): that message takes the record's place and is triaged, once.

**Metrics.** ``vigil_confessions_total`` counts a confession once, when it is first
recorded. The incident gauges are what ``vigil-incidents`` holds (every auditor watches it),
so they agree across auditors and follow acks and resolves from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from datetime import datetime

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from vigil import codec, ids, subjects, topology
from vigil.consume import PullConsumer, keep_lease
from vigil.errors import NatsUnavailable
from vigil.jetstream import publish, publish_confession, retrying
from vigil.lifecycle import Late, Lifecycle
from vigil.messages import Confession, ConfessionRecord, Incident, utcnow
from vigil_auditor import triage
from vigil_auditor.metrics import Metrics
from vigil_auditor.notify import Notifier
from vigil_auditor.record import TRIAGE_FAILED_NOTE, repeats, to_record
from vigil_auditor.settings import AuditorSettings

log = structlog.get_logger("vigil.auditor")
_incident = msgspec.json.Decoder(Incident)
_record = msgspec.json.Decoder(ConfessionRecord)
PUBLISHED = "published"  # vigil-deliveries key prefix: alerts published on vigil.alerts
TRIAGE_FAILED = "triage_failed"
NATS_RETRY_S = 1.0
# In-progress acks this often keep a confession's lease: well inside the ack wait, so one
# late beat (a busy loop, a reconnect) does not lose it.
HEARTBEAT_S = (topology.auditor_consumer().ack_wait or 10.0) / 3
# Deliveries without any decision (each auditor that got it died or was cut off while
# holding it) after which a confession is given up without trying it again.
STUCK_DELIVERIES = 50


def published_key(alert_id: str) -> str:
    return f"{PUBLISHED}.{alert_id}"


def retry_delay(delivered: int) -> float:
    """Backoff before the next try of a confession whose triage failed: 0.5, 1, 2 … 4 s."""
    return float(min(0.5 * 2 ** max(delivered - 1, 0), 4.0))


class Auditor:
    # The buckets, once connected: confessions (the records), incidents, deliveries.
    _kv = Late[KeyValue]()
    _incidents = Late[KeyValue]()
    _deliveries = Late[KeyValue]()

    def __init__(self, settings: AuditorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._life = Lifecycle("auditor", settings, self.metrics.registry)
        self._stop = self._life.stopping
        self.ready = self._life.ready
        self._consumer: PullConsumer | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def http_port(self) -> int:
        return self._life.http_port

    async def run(self) -> None:
        s, life = self.settings, self._life
        async with life:
            nc, js = await life.connect()
            await topology.ensure_consumer(js, subjects.STREAM_ISSUES, topology.auditor_consumer())
            self._kv = await js.key_value(subjects.KV_CONFESSIONS)
            self._incidents = await js.key_value(subjects.KV_INCIDENTS)
            self._deliveries = await js.key_value(subjects.KV_DELIVERIES)
            # Closed in this order: the consumer, the confessions in flight, the notifier
            # (it may send what they raised), the gauges' watch.
            consumer = self._consumer = PullConsumer(nc, subjects.STREAM_ISSUES,
                                                     subjects.CONSUMER_AUDITOR, capacity=1)
            life.on_close(consumer.stop)
            life.on_close_wait(self._inflight, 10)
            notifier = Notifier(nc, js, s.urls, s.webhook_secret,
                                s.webhook_max_attempts, s.webhook_timeout_s, s.node)
            life.on_close_wait({asyncio.create_task(notifier.run(self._stop))}, 10)
            watch = asyncio.create_task(self._watch_incidents())
            life.on_close(watch.cancel)
            life.on_close(lambda: asyncio.gather(watch, return_exceptions=True))
            await consumer.start()
            life.on_reconnect(consumer.reset)
            life.started(http_port=life.http_port)
            await self._loop(consumer)

    async def shutdown(self) -> None:
        await self._life.shutdown()

    async def _watch_incidents(self) -> None:
        """Keep the incident gauges equal to what ``vigil-incidents`` holds."""
        kv = self._incidents
        tally = self.metrics.incidents
        while not self._stop.is_set():
            watcher = None
            try:
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None:  # the bucket's contents at the start are all read
                        tally.synced = True
                    elif entry.operation in ("DEL", "PURGE"):
                        tally.delete(entry.key)
                    else:
                        tally.put(entry.key, entry.value or b"")
            except Exception as exc:  # a gauge is not worth stopping for: watch again
                log.warning("incident_watch_failed", error=repr(exc))
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        # nats-py leaves KeyWatcher.stop unannotated.
                        await watcher.stop()  # type: ignore[no-untyped-call]
            tally.reset()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)

    async def _loop(self, consumer: PullConsumer) -> None:
        async for msg in consumer.until(self._stop):
            # One at a time, in order: see the module docstring.
            task = asyncio.create_task(self._handle(msg))
            self._inflight.add(task)
            task.add_done_callback(self._done)
            await asyncio.wait({task})

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._consumer is not None:
            self._consumer.release(1)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("handler_crashed", error=repr(exc))

    # one confession -------------------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        seq, attempt = meta.sequence.stream, meta.num_delivered
        msg_id = msg.headers.get(subjects.MSG_ID) if msg.headers else None
        record = to_record(msg.subject, msg.data, msg_id, seq, utcnow())
        log_ = log.bind(confession_id=record.id, stream_seq=seq, attempt=attempt)
        lease = asyncio.create_task(keep_lease(msg, HEARTBEAT_S))
        try:
            delay = await self._settle(record, meta.timestamp, attempt, log_)
        finally:
            # The beats end before the decision: one after a nak would undo its delay.
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)
        try:
            if delay is None:
                await msg.ack()
            else:
                await msg.nak(delay=delay)
        except Exception as exc:  # it comes back; recording and triage are idempotent
            log_.warning("decision_failed", error=repr(exc), nak=delay)

    async def _settle(self, record: ConfessionRecord, at: datetime, attempt: int,
                      log_: structlog.stdlib.BoundLogger) -> float | None:
        """Record and triage one delivery. None: ack it; a number: nak it with that delay."""
        failure: Exception | None = None
        if attempt > STUCK_DELIVERIES:  # (VIGIL_TRIAGE_ATTEMPTS is at most 10)
            failure = RuntimeError(f"delivered {attempt} times without an outcome (auditors "
                                   "died or were cut off while triaging it)")
            log_.error("triage_given_up", error=str(failure))
        while True:
            try:
                if failure is None:
                    await self._process(record, at)
                else:
                    await self._give_up(record, failure, attempt)
                return None
            except NatsUnavailable as exc:
                # Nothing newer can be triaged before this one anyway: keep it (the lease
                # is kept, so no delivery is spent and no bug retry is counted) and retry.
                if self._stop.is_set():
                    log_.warning("confession_handed_back", error=str(exc))
                    return 0.0
                log_.warning("confession_retry", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), NATS_RETRY_S)
            except Exception as exc:
                if failure is not None:  # the log lines are all there is
                    log_.exception("triage_give_up_failed")
                    return None
                if attempt < self.settings.triage_attempts:
                    log_.exception("triage_failed_retrying")
                    return retry_delay(attempt)
                log_.exception("triage_given_up")
                failure = exc

    async def _process(self, record: ConfessionRecord, at: datetime) -> None:
        first = await self._record(record)
        c = record.confession
        if first is None:
            log.info("confession_repeated", confession_id=record.id,
                     stream_seq=record.stream_seq)
            return
        if first:
            if record.error and c is None:
                self.metrics.invalid.inc()
            self.metrics.confessions.labels(record.source or "unknown",
                                            record.severity or "unknown").inc()
        await self._triage(record, at)
        log.info("confession_recorded", confession_id=record.id, source=record.source,
                 severity=record.severity, summary=c.summary if c else None,
                 task_id=c.task_id if c else None, error=record.error, first=first)

    async def _record(self, record: ConfessionRecord) -> bool | None:
        """Record a confession: True when this message recorded it, False when it was
        recorded by this same stream message before (a redelivery, a replay), None when
        another message recorded that id (a repeat, not to be triaged)."""
        kv = self._kv
        data = codec.encode(record)
        try:
            # First write wins: nobody can overwrite evidence by reusing a confession's id.
            await retrying(f"record confession {record.id}", lambda: kv.create(record.id, data))
            return True
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await retrying("read confession", lambda: kv.get(record.id))
            existing = _record.decode(entry.value or b"")
        except KeyNotFoundError:  # gone since (its TTL): ours is as good as first
            return False
        except msgspec.DecodeError:
            log.warning("confession_record_unreadable", confession_id=record.id)
            return False
        if repeats(existing, record):
            return None
        if existing.stream_seq != record.stream_seq:
            # Its triage was given up and this message re-publishes it: it takes the
            # record's place (so a further copy repeats it) and is triaged.
            revision = int(entry.revision or 0)
            # One confession is in flight: a wrong last sequence can only be our own retried
            # write, which got there.
            with contextlib.suppress(KeyWrongLastSequenceError):
                await retrying(f"replace confession {record.id}",
                               functools.partial(kv.update, record.id, data, last=revision))
            log.info("confession_retriaged", confession_id=record.id,
                     given_up_seq=existing.stream_seq, stream_seq=record.stream_seq)
        return False

    async def _triage(self, record: ConfessionRecord, at: datetime) -> None:
        action = triage.operator_action(record)
        key = action[1] if action else triage.key_of(record)
        if key is None or not ids.is_valid_id(key):
            return
        kv = self._incidents
        for _ in range(10):
            try:
                entry = await retrying("read incident", lambda: kv.get(key))
                current = _incident.decode(entry.value or b"")
                revision: int | None = int(entry.revision or 0)
            except KeyNotFoundError:
                current, revision = None, None
            updated, alerts = triage.apply(current, record, at)
            if updated is None:
                return
            for alert in alerts:
                await self._announce(alert)
            try:
                await retrying("write incident",
                               functools.partial(_write, kv, key, codec.encode(updated), revision))
            except KeyWrongLastSequenceError:
                continue  # another auditor, or our own lost reply: read again, re-apply
            log.info("incident_updated", incident_id=key, count=updated.count,
                     severity=updated.severity, status=updated.status)
            return
        raise RuntimeError(f"incident {key} kept changing under us (10 writes lost)")

    async def _announce(self, alert: triage.Alert) -> None:
        """Publish an alert unless it was published before (a replay), and note that it was."""
        kv, js = self._deliveries, self._life.conn.js
        key = published_key(alert.id)
        try:
            await retrying("read alert record", lambda: kv.get(key))
            log.info("alert_already_published", alert_id=alert.id)
            return
        except KeyNotFoundError:
            pass
        await publish(js, subjects.alert(alert.severity), codec.encode(alert), alert.id)
        note = codec.encode({"alert_id": alert.id, "status": PUBLISHED,
                             "incident_id": alert.incident_id, "severity": alert.severity,
                             "reason": alert.reason, "at": alert.time})
        await retrying("record alert", lambda: kv.put(key, note))
        self.metrics.alerts.labels(alert.severity, alert.reason).inc()
        if alert.reason in ("opened", "reopened"):
            self.metrics.opened.labels(alert.severity).inc()
        log.info("alert_published", alert_id=alert.id, reason=alert.reason)

    async def _give_up(self, record: ConfessionRecord, exc: Exception, attempts: int) -> None:
        """Triage of ``record`` keeps failing: keep the evidence, say so, move on."""
        kv, js = self._kv, self._life.conn.js
        note = f"{TRIAGE_FAILED_NOTE} {attempts} deliveries: {type(exc).__name__}: {exc}"[:1_000]
        self.metrics.triage_failed.inc()
        noted = msgspec.structs.replace(record, error="; ".join(
            e for e in (record.error, note) if e), triage_given_up_after=attempts)
        slim = msgspec.structs.replace(noted, confession=None,
                                       raw=(record.raw or repr(record.confession))[:2_000])
        for candidate in (noted, slim):  # the full record may be what cannot be stored
            data = codec.encode(candidate)
            try:
                await retrying(f"note triage failure {record.id}",
                               functools.partial(kv.put, record.id, data))
                break
            except NatsUnavailable:
                raise
            except Exception as put_exc:
                log.warning("triage_failure_not_noted", confession_id=record.id,
                            error=repr(put_exc))
        c = record.confession
        if record.source == "auditor" and c is not None and c.category == TRIAGE_FAILED:
            return  # confessing a failure to triage a confession of one would never end
        digest = hashlib.sha256(record.id.encode()).hexdigest()[:24]
        await publish_confession(js, Confession(
            id=f"auditor-triage-failed-{digest}",
            summary=f"a confession from {record.source or 'unknown'} could not be triaged",
            severity="error", category=TRIAGE_FAILED,
            detail=f"confession {record.id} (stream sequence {record.stream_seq}): {note}",
            hint=f"it is kept in vigil-confessions under {record.id}; fix the cause, then "
            "re-publish it and it is triaged (once): vigil replay stream "
            f"{subjects.STREAM_ISSUES} --from-seq {record.stream_seq} --to-seq "
            f"{record.stream_seq} --to {record.subject} --yes (to try once more later, add "
            "--replay-id with a new name)",
            task_id=c.task_id if c else None, tenant=c.tenant if c else None,
            source="auditor", node=self.settings.node, component="auditor", time=utcnow(),
            data={"confession_id": record.id, "stream_seq": record.stream_seq},
        ))


async def _write(kv: KeyValue, key: str, data: bytes, revision: int | None) -> int:
    if revision is None:
        return int(await kv.create(key, data))
    return int(await kv.update(key, data, last=revision))
