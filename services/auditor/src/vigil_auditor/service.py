"""The auditor: consumes ``vigil.issues.>`` durably, records every confession in
``vigil-confessions``, triages it into an incident in ``vigil-incidents``
(:mod:`vigil_auditor.triage`), and raises alerts on ``vigil.alerts.<severity>``, which
:mod:`vigil_auditor.notify` sends to webhooks.

Confessions are handled one at a time, in stream order (the consumer allows one
unacknowledged message across all auditors, so a message held by one that died comes back
before anything newer): an incident remembers the newest stream sequence it applied, so a
redelivery after a crash counts nothing twice, and a replay of the stream from the start
rebuilds the same incidents. Alerts are published
before the incident is written (their ids are deterministic, so a repeat is deduplicated)
so a crash in between loses no alert. Each message ends in an explicit decision: done ->
ack; NATS unavailable -> nak with a delay; anything else -> recorded, confessed, acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from datetime import datetime

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from vigil import codec, ids, subjects, topology
from vigil.conn import connect
from vigil.consume import PullConsumer
from vigil.errors import NatsUnavailable
from vigil.jetstream import publish, retrying
from vigil.messages import ConfessionRecord, Incident, utcnow
from vigil.ops import OpsServer, ops_app
from vigil_auditor import triage
from vigil_auditor.metrics import Metrics
from vigil_auditor.notify import Notifier
from vigil_auditor.record import to_record
from vigil_auditor.settings import AuditorSettings

log = structlog.get_logger("vigil.auditor")
_incident = msgspec.json.Decoder(Incident)


class Auditor:
    def __init__(self, settings: AuditorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._incidents: KeyValue | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._consumer: PullConsumer | None = None
        self._ops: OpsServer | None = None
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

    @property
    def http_port(self) -> int:
        return self._ops.port if self._ops else 0

    async def run(self) -> None:
        s = self.settings
        app = ops_app(self.metrics.registry, self._health)
        self._ops = OpsServer(app, s.http_host, s.http_port)
        await self._ops.start()
        try:
            self._nc = await connect(s.nats_url, "vigil-auditor", on_reconnect=self._on_reconnect,
                                     inbox_prefix=subjects.inbox("auditor"))
            self._js = self._nc.jetstream(timeout=5.0)
            await topology.ensure_topology(self._js, s.replicas)
            await topology.ensure_consumer(self._js, subjects.STREAM_ISSUES,
                                           topology.auditor_consumer())
            self._kv = await self._js.key_value(subjects.KV_CONFESSIONS)
            self._incidents = await self._js.key_value(subjects.KV_INCIDENTS)
            try:
                await self._count_open()
            except Exception as exc:  # a gauge is not worth failing the start for
                log.warning("open_incident_count_failed", error=str(exc))
            notifier = Notifier(self._nc, self._js, s.urls, s.webhook_secret,
                                s.webhook_max_attempts, s.webhook_timeout_s, s.node)
            self._notifier = asyncio.create_task(notifier.run(self._stop))
            self._consumer = PullConsumer(self._nc, subjects.STREAM_ISSUES,
                                          subjects.CONSUMER_AUDITOR, capacity=1)
            await self._consumer.start()
            log.info("auditor_started", http_port=self._ops.port)
            self.ready.set()
            await self._loop()
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=10)
            if self._notifier is not None:
                await asyncio.wait({self._notifier}, timeout=10)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            await self._ops.stop()
            log.info("auditor_stopped")

    async def shutdown(self) -> None:
        self._stop.set()

    async def _count_open(self) -> None:
        """Start the open-incidents gauge from what the bucket holds."""
        kv = self._incidents
        assert kv is not None
        try:
            keys = await kv.keys()
        except NoKeysError:
            keys = []
        open_now = 0
        for key in keys:
            with contextlib.suppress(KeyNotFoundError):
                entry = await kv.get(key)
                open_now += _incident.decode(entry.value or b"").status == "open"
        self.metrics.open_incidents.set(open_now)

    async def _triage(self, record: ConfessionRecord, at: datetime) -> None:
        action = triage.operator_action(record)
        key = action[1] if action else triage.key_of(record)
        if key is None or not ids.is_valid_id(key):
            return
        kv = self._incidents
        assert kv is not None and self._js is not None
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
                await publish(self._js, subjects.alert(alert.severity), codec.encode(alert),
                              alert.id)
                self.metrics.alerts.labels(alert.severity, alert.reason).inc()
            try:
                await retrying("write incident",
                               functools.partial(_write, kv, key, codec.encode(updated), revision))
            except KeyWrongLastSequenceError:
                continue  # another auditor, or our own lost reply: read again, re-apply
            was_open = current is not None and current.status == "open"
            if updated.status == "open" and not was_open:
                self.metrics.opened.labels(updated.severity).inc()
                self.metrics.open_incidents.inc()
            elif was_open and updated.status != "open":
                self.metrics.open_incidents.dec()
            log.info("incident_updated", incident_id=key, count=updated.count,
                     severity=updated.severity, status=updated.status)
            return

    async def _on_reconnect(self) -> None:
        if self._consumer is not None:
            self._consumer.reset()

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self._nc is not None and self._nc.is_connected
        return connected and self.ready.is_set(), {"nats": connected}

    async def _loop(self) -> None:
        assert self._consumer is not None
        async for msg in self._consumer.until(self._stop):
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

    async def _handle(self, msg: Msg) -> None:
        assert self._kv is not None
        seq = msg.metadata.sequence.stream
        msg_id = msg.headers.get(subjects.MSG_ID) if msg.headers else None
        record = to_record(msg.subject, msg.data, msg_id, seq, utcnow())
        kv = self._kv
        data = codec.encode(record)
        async def create() -> None:
            # First write wins: a redelivery (or a replay) finds its record already there,
            # and nobody can overwrite evidence by publishing a confession with its id.
            with contextlib.suppress(KeyWrongLastSequenceError):
                await kv.create(record.id, data)

        try:
            await retrying(f"record confession {record.id}", create)
        except NatsUnavailable as exc:
            log.warning("confession_retry", error=str(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=2.0)
            return
        try:
            await self._triage(record, msg.metadata.timestamp)
        except NatsUnavailable as exc:
            log.warning("triage_retry", error=str(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=2.0)
            return
        except Exception:
            # The confession itself is recorded; its triage failed (a bug of ours). Retry
            # slowly; the consumer's max deliveries bound it, and the log says why.
            log.exception("triage_failed", confession_id=record.id)
            with contextlib.suppress(Exception):
                await msg.nak(delay=30.0)
            return
        await msg.ack()
        if record.error and record.confession is None:
            self.metrics.invalid.inc()
        self.metrics.confessions.labels(record.source or "unknown",
                                        record.severity or "unknown").inc()
        c = record.confession
        log.info("confession_recorded", confession_id=record.id, source=record.source,
                 severity=record.severity, summary=c.summary if c else None,
                 task_id=c.task_id if c else None, error=record.error)


async def _write(kv: KeyValue, key: str, data: bytes, revision: int | None) -> int:
    if revision is None:
        return int(await kv.create(key, data))
    return int(await kv.update(key, data, last=revision))
