"""Alerts to webhooks: signed, retried with backoff, and recorded either way.

Alerts are read durably from ``VIGIL_ALERTS``. Each is POSTed to every configured
webhook as JSON with ``X-Vigil-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the shared secret>`` and ``X-Vigil-Alert-Id`` (receivers dedupe on it).
A failed delivery is retried by naking the alert with an exponential delay (1, 2, 4 … 60
s); the ``max_attempts``-th delivery records the failure in ``vigil-deliveries`` (the
dead-letter record), confesses it and acks. Delivered URLs are recorded too, so a retry
never sends an alert twice to the same receiver.

Every alert ends in a decision (the consumer's max deliveries is unlimited, so nothing
else bounds the tries): an alert that is not a JSON object is terminated and confessed
(``alert_undecodable``); any other failure (a bug, a KV write refused) is retried like a
failed delivery and, from the ``max_attempts``-th delivery on, recorded as failed for the
receivers that did not get it (as far as that still works), confessed
(``notify_failed``) and acked. Only NATS not answering is retried until it answers: that
says nothing about the alert.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Literal

import aiohttp
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from vigil import codec, subjects, topology
from vigil.consume import PullConsumer, keep_lease
from vigil.errors import NatsUnavailable
from vigil.jetstream import publish_confession, retrying
from vigil.messages import Confession, utcnow

log = structlog.get_logger("vigil.auditor.notify")

# In-progress acks while one alert is being delivered: a third of the consumer's ack wait.
LEASE_BEAT_S = (topology.notifier_consumer().ack_wait or 60.0) / 3


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    alert_id: str
    url: str
    status: Literal["delivered", "failed"]
    attempts: int
    error: str | None = None
    at: str


_delivery_decoder = msgspec.json.Decoder(Delivery)


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
        # One alert at a time: a prefetched alert would wait in our queue while its ack
        # wait ran out, come back and be POSTed twice.
        consumer = PullConsumer(self._nc, subjects.STREAM_ALERTS, subjects.CONSUMER_NOTIFIER,
                                capacity=1, max_batch=1)
        await consumer.start()
        async with aiohttp.ClientSession(timeout=self._timeout) as http:
            try:
                async for msg in consumer.until(stop):
                    try:
                        await self._handle(http, msg)
                    except Exception as exc:  # a decision failed: the alert comes back
                        log.warning("notify_decision_failed", error=repr(exc))
                    finally:
                        consumer.release(1)
            finally:
                await consumer.stop()

    async def _handle(self, http: aiohttp.ClientSession, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        try:
            alert = codec.any_decoder.decode(msg.data)
            if not isinstance(alert, dict):
                raise ValueError(f"an alert is a JSON object, not {type(alert).__name__}")
        except (msgspec.DecodeError, ValueError) as exc:
            await self._reject(msg, exc)
            return
        alert_id = str(alert.get("id", msg.metadata.sequence.stream))
        # Many unreachable receivers, each up to its timeout: keep the alert meanwhile.
        # The beats end before the decision: one after a nak would undo its delay.
        lease = asyncio.create_task(keep_lease(msg, LEASE_BEAT_S))
        failure: Exception | None = None
        try:
            delay = await self._deliver(http, msg, alert_id, attempt)
        except NatsUnavailable as exc:
            log.warning("notify_retry", alert_id=alert_id, attempt=attempt, error=str(exc))
            delay = backoff(attempt)
        except Exception as exc:
            if attempt < self._max_attempts:
                log.exception("notify_failed_retrying", alert_id=alert_id, attempt=attempt)
                delay = backoff(attempt)
            else:
                log.exception("notify_given_up", alert_id=alert_id, attempt=attempt)
                failure, delay = exc, None
        finally:
            lease.cancel()
            await asyncio.gather(lease, return_exceptions=True)
        if failure is not None:
            await self._abandon(msg, alert_id, attempt, failure)
        elif delay is None:
            await msg.ack()
        else:
            await msg.nak(delay=delay)

    async def _reject(self, msg: Msg, exc: Exception) -> None:
        """An alert nobody can read: say so, and never deliver it again."""
        seq = msg.metadata.sequence.stream
        digest = hashlib.sha256(f"{seq}.".encode() + msg.data).hexdigest()[:24]
        log.error("alert_undecodable", stream_seq=seq, subject=msg.subject, error=str(exc))
        try:
            await publish_confession(self._js, Confession(
                id=f"auditor-alert-undecodable-{digest}",
                summary="an alert could not be decoded; it was not sent to the webhooks",
                severity="error", category="alert_undecodable",
                detail=f"{msg.subject}: {exc}"[:2_000],
                hint=f"it is kept in {subjects.STREAM_ALERTS} at stream sequence {seq}; "
                "whatever published it there must publish auditor alerts (JSON objects)",
                source="auditor", node=self._node, component="auditor", time=utcnow(),
                data={"stream_seq": seq, "subject": msg.subject,
                      "raw": msg.data[:500].decode("utf-8", errors="replace")},
            ))
        except NatsUnavailable as nats_exc:  # not confessed yet: keep it until it is
            log.warning("notify_retry", stream_seq=seq, error=str(nats_exc))
            await msg.nak(delay=backoff(msg.metadata.num_delivered))
            return
        except Exception:  # the log lines are all there is; retrying cannot decode it
            log.exception("alert_undecodable_not_confessed", stream_seq=seq)
        await msg.term()

    async def _abandon(self, msg: Msg, alert_id: str, attempt: int, exc: Exception) -> None:
        """Give up an alert whose handling keeps failing: record it as failed for every
        receiver not known to have it (best effort: that may be what fails), confess, ack."""
        error = f"{type(exc).__name__}: {exc}"[:1_000]
        for url in self._urls:
            try:
                if await self._delivered(alert_id, url):
                    continue
                await self._record(Delivery(alert_id=alert_id, url=url, status="failed",
                                            attempts=attempt, error=error,
                                            at=utcnow().isoformat()))
            except Exception as record_exc:
                log.warning("delivery_not_recorded", alert_id=alert_id, error=repr(record_exc))
        digest = hashlib.sha256(alert_id.encode()).hexdigest()[:24]
        try:
            await publish_confession(self._js, Confession(
                id=f"auditor-notify-failed-{digest}",
                summary=f"alert {alert_id} could not be sent to the webhooks after {attempt} "
                "attempts", severity="error", category="notify_failed", detail=error,
                hint="the auditor's log has the traceback (notify_given_up); the alert stays "
                f"in {subjects.STREAM_ALERTS}", source="auditor", node=self._node,
                component="auditor", time=utcnow(), data={"alert_id": alert_id},
            ))
        except NatsUnavailable as nats_exc:  # not confessed yet: keep it until it is
            log.warning("notify_retry", alert_id=alert_id, error=str(nats_exc))
            await msg.nak(delay=backoff(attempt))
            return
        except Exception:  # the log lines are all there is
            log.exception("notify_give_up_failed", alert_id=alert_id)
        await msg.ack()

    async def _deliver(self, http: aiohttp.ClientSession, msg: Msg, alert_id: str,
                       attempt: int) -> float | None:
        """POST the alert to every receiver that lacks it. None: done (delivered, or given
        up and recorded); a number: try again after that many seconds."""
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
            return None
        if not last_chance:
            log.warning("webhook_retry", alert_id=alert_id, attempt=attempt,
                        errors=list(errors.values()))
            return backoff(attempt)
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
        return None

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
        if not entry.value:
            return False
        try:
            return _delivery_decoder.decode(entry.value).status == "delivered"
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False  # unreadable: deliver again (receivers dedupe by alert id)

    async def _record(self, delivery: Delivery) -> None:
        assert self._kv is not None
        kv, data = self._kv, codec.encode(delivery)
        await retrying("record delivery",
                       lambda: kv.put(delivery_key(delivery.alert_id, delivery.url), data))
