"""The auditor: consumes ``vigil.issues.>`` durably and records every confession in the
``vigil-confessions`` bucket (triage into incidents comes later).

Each message ends in an explicit decision: recorded -> ack; NATS unavailable -> nak with a
delay. Recording is a KV put keyed by the confession's id, so a redelivery rewrites the
same key and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from vigil import codec, subjects, topology
from vigil.conn import connect
from vigil.consume import PullConsumer
from vigil.errors import NatsUnavailable
from vigil.jetstream import retrying
from vigil.messages import utcnow
from vigil.ops import OpsServer, ops_app
from vigil_auditor.metrics import Metrics
from vigil_auditor.record import to_record
from vigil_auditor.settings import AuditorSettings

log = structlog.get_logger("vigil.auditor")


class Auditor:
    def __init__(self, settings: AuditorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
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
            self._consumer = PullConsumer(self._nc, subjects.STREAM_ISSUES,
                                          subjects.CONSUMER_AUDITOR, capacity=s.batch,
                                          max_batch=s.batch)
            await self._consumer.start()
            log.info("auditor_started", http_port=self._ops.port)
            self.ready.set()
            await self._loop()
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=10)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            await self._ops.stop()
            log.info("auditor_stopped")

    async def shutdown(self) -> None:
        self._stop.set()

    async def _on_reconnect(self) -> None:
        if self._consumer is not None:
            self._consumer.reset()

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self._nc is not None and self._nc.is_connected
        return connected and self.ready.is_set(), {"nats": connected}

    async def _loop(self) -> None:
        assert self._consumer is not None
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                nxt = asyncio.ensure_future(self._consumer.next())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    break
                task = asyncio.create_task(self._handle(nxt.result()))
                self._inflight.add(task)
                task.add_done_callback(self._done)
        finally:
            stop.cancel()

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
        await msg.ack()
        if record.error and record.confession is None:
            self.metrics.invalid.inc()
        self.metrics.confessions.labels(record.source or "unknown",
                                        record.severity or "unknown").inc()
        c = record.confession
        log.info("confession_recorded", confession_id=record.id, source=record.source,
                 severity=record.severity, summary=c.summary if c else None,
                 task_id=c.task_id if c else None, error=record.error)
