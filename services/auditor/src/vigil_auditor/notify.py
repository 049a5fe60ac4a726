"""Alerts to webhooks: signed, retried with backoff, and recorded either way.

Alerts are read durably from ``VIGIL_ALERTS``. Each is POSTed to every configured
webhook as JSON with ``X-Vigil-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the shared secret>`` and ``X-Vigil-Alert-Id`` (receivers dedupe on it).
A failed delivery is retried by naking the alert with an exponential delay (1, 2, 4 … 60
s); the JetStream consumer's max deliveries bounds the attempts, and the last one records
the failure in ``vigil-deliveries`` (the dead-letter record) and confesses it. Delivered
URLs are recorded too, so a retry never sends an alert twice to the same receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from vigil import codec, subjects, topology
from vigil.consume import PullConsumer
from vigil.jetstream import publish_confession, retrying
from vigil.messages import Confession, utcnow

log = structlog.get_logger("vigil.auditor.notify")


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: str
    url: str
    status: str  # delivered | failed
    attempts: int
    error: str | None = None
    at: str


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """What a receiver does (used by the tests): constant-time, with replay tolerance."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def backoff(delivered: int) -> float:
    return float(min(2 ** max(delivered - 1, 0), 60))


def delivery_key(alert_id: str, url: str) -> str:
    return f"{alert_id}.{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class Notifier:
    def __init__(self, nc: NATS, js: JetStreamContext, urls: list[str], secret: str,
                 max_attempts: int, timeout_s: float, node: str) -> None:
        self._nc, self._js = nc, js
        self._urls = urls
        self._secret = secret
        self._max_attempts = max_attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._node = node
        self._kv: KeyValue | None = None

    async def run(self, stop: asyncio.Event) -> None:
        if not self._urls:
            return
        self._kv = await self._js.key_value(subjects.KV_DELIVERIES)
        await topology.ensure_consumer(self._js, subjects.STREAM_ALERTS,
                                       topology.notifier_consumer())
        consumer = PullConsumer(self._nc, subjects.STREAM_ALERTS, subjects.CONSUMER_NOTIFIER,
                                capacity=16, max_batch=16)
        await consumer.start()
        async with aiohttp.ClientSession(timeout=self._timeout) as http:
            try:
                async for msg in consumer.until(stop):
                    try:
                        await self._deliver(http, msg)
                    except Exception:
                        log.exception("notify_failed")
                        with contextlib.suppress(Exception):
                            await msg.nak(delay=30)
                    finally:
                        consumer.release(1)
            finally:
                await consumer.stop()

    async def _deliver(self, http: aiohttp.ClientSession, msg: Msg) -> None:
        alert: dict[str, Any] = codec.any_decoder.decode(msg.data)
        alert_id = str(alert.get("id", msg.metadata.sequence.stream))
        attempt = msg.metadata.num_delivered
        last_chance = attempt >= self._max_attempts
        pending = [u for u in self._urls if not await self._delivered(alert_id, u)]
        errors: dict[str, str] = {}
        for url in pending:
            error = await self._post(http, url, alert_id, msg.data)
            if error is None:
                await self._record(Delivery(alert_id=alert_id, url=url, status="delivered",
                                            attempts=attempt, at=utcnow().isoformat()))
            else:
                errors[url] = error
        if not errors:
            await msg.ack()
            return
        if not last_chance:
            log.warning("webhook_retry", alert_id=alert_id, attempt=attempt,
                        errors=list(errors.values()))
            await msg.nak(delay=backoff(attempt))
            return
        for url, error in errors.items():
            await self._record(Delivery(alert_id=alert_id, url=url, status="failed",
                                        attempts=attempt, error=error, at=utcnow().isoformat()))
            await publish_confession(self._js, Confession(
                id=f"auditor-webhook-failed-{delivery_key(alert_id, url)}",
                summary=f"alert {alert_id} could not be delivered to a webhook after "
                f"{attempt} attempts", severity="error", category="webhook_failed",
                detail=error, hint="check the receiver; the alert stays in VIGIL_ALERTS",
                source="auditor", node=self._node, component="auditor", time=utcnow(),
                data={"url_sha": delivery_key(alert_id, url).rsplit(".", 1)[-1]},
            ))
        log.error("webhook_gave_up", alert_id=alert_id, attempts=attempt)
        await msg.ack()

    async def _post(self, http: aiohttp.ClientSession, url: str, alert_id: str,
                    body: bytes) -> str | None:
        headers = {"Content-Type": "application/json", "X-Vigil-Alert-Id": alert_id,
                   "X-Vigil-Signature": sign(self._secret, int(time.time()), body),
                   "User-Agent": "vigil-auditor/0.1"}
        try:
            async with http.post(url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _delivered(self, alert_id: str, url: str) -> bool:
        assert self._kv is not None
        kv = self._kv
        try:
            entry = await retrying("read delivery", lambda: kv.get(delivery_key(alert_id, url)))
        except KeyNotFoundError:
            return False
        return bool(entry.value) and b'"delivered"' in (entry.value or b"")

    async def _record(self, delivery: Delivery) -> None:
        assert self._kv is not None
        kv, data = self._kv, codec.encode(delivery)
        await retrying("record delivery",
                       lambda: kv.put(delivery_key(delivery.alert_id, delivery.url), data))
