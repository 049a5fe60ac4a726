"""``vigil.Client``: the async Python SDK for the gateway's HTTP API (the CLI uses it).

    async with Client("http://127.0.0.1:8080", token="vgl_…") as client:
        task = await client.submit({"command": ["python3", "-c", "print('hi')"]})
        async for event in client.events(task["id"]):
            print(event.kind, event.data)
        state = await client.get(task["id"])

Event streams reconnect on their own with ``Last-Event-ID``, so a dropped connection
neither loses nor repeats an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from vigil import codec
from vigil.errors import ApiError, VigilError
from vigil.messages import TaskSpec, TaskState


@dataclass(frozen=True)
class StreamEvent:
    seq: int
    kind: str
    data: dict[str, Any]


class Client:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": "vigil-client/0.1"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def _request(self, method: str, path: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, self.url + path, data=body, headers=hdrs,
                                            timeout=self._timeout) as resp:
                payload = await resp.read()
                data = codec.any_decoder.decode(payload) if payload else None
                if resp.status >= 400:
                    err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                    raise ApiError(resp.status, err.get("message") or resp.reason or "error",
                                   field=err.get("field"))
                return resp.status, data
        except aiohttp.ClientConnectionError as exc:
            raise VigilError(
                f"cannot reach the gateway at {self.url} ({exc}); is `vigil up` running, "
                "and is VIGIL_GATEWAY_URL right?", retryable=True,
            ) from exc
        except TimeoutError as exc:
            raise VigilError(
                f"the gateway at {self.url} did not answer {method} {path} in time; see its "
                "log", retryable=True,
            ) from exc

    async def submit(self, spec: TaskSpec | Mapping[str, Any], *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a task; returns ``{"id", "status", "links", …}``."""
        body = codec.encode(spec) if isinstance(spec, TaskSpec) else codec.encode(dict(spec))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        _, data = await self._request("POST", "/v1/tasks", body=body, headers=headers)
        return dict(data)

    async def get(self, task_id: str) -> TaskState:
        _, data = await self._request("GET", f"/v1/tasks/{task_id}")
        return msgspec.convert(data, TaskState)

    async def confessions(self, task_id: str) -> list[dict[str, Any]]:
        """The confessions on the task's timeline, oldest first."""
        _, data = await self._request("GET", f"/v1/tasks/{task_id}?include=confessions")
        return list(data.get("confessions", []))

    async def events(self, task_id: str, last_event_id: int | None = None,
                     *, reconnect: bool = True) -> AsyncIterator[StreamEvent]:
        """Yield the task's events until its final ``finished`` event."""
        last = last_event_id
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self.session.get(
                    f"{self.url}/v1/tasks/{task_id}/events", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
                ) as resp:
                    if resp.status >= 400:
                        payload = await resp.read()
                        data = codec.any_decoder.decode(payload) if payload else {}
                        raise ApiError(resp.status, data.get("error", {}).get("message", ""))
                    async for event in _parse_sse(resp.content):
                        failures = 0
                        last = event.seq
                        yield event
                        if event.kind == "finished" and event.data.get("final", True):
                            return
                # The server ended the stream before the final event (it restarted, or a
                # proxy cut it): resume after the last event seen.
                failures += 1
                if not reconnect or failures > 10:
                    raise VigilError(f"event stream for {task_id} ended early", retryable=True)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                failures += 1
                if not reconnect or failures > 10:
                    raise VigilError(f"event stream for {task_id} broke: {exc}",
                                     retryable=True) from exc
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))

    async def wait(self, task_id: str) -> TaskState:
        """Wait until the task reaches a final state; return it."""
        async for _ in self.events(task_id):
            pass
        return await self.get(task_id)

    async def incidents(self, **filters: str) -> list[dict[str, Any]]:
        """Incidents (filters: status, severity, tenant), newest activity first."""
        query = "&".join(f"{k}={v}" for k, v in filters.items() if v)
        _, data = await self._request("GET", "/v1/incidents" + (f"?{query}" if query else ""))
        return list(data["incidents"])

    async def incident(self, incident_id: str) -> dict[str, Any]:
        _, data = await self._request("GET", f"/v1/incidents/{incident_id}")
        return dict(data)

    async def incident_action(self, incident_id: str, action: str) -> dict[str, Any]:
        """``action`` is ``ack`` or ``resolve`` (operator role)."""
        _, data = await self._request("POST", f"/v1/incidents/{incident_id}/{action}")
        return dict(data)

    async def health(self) -> dict[str, Any]:
        _, data = await self._request("GET", "/healthz")
        return dict(data)


async def _parse_sse(content: aiohttp.StreamReader) -> AsyncIterator[StreamEvent]:
    seq, kind = 0, "message"
    data_lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data_lines:
                try:
                    data = codec.any_decoder.decode("\n".join(data_lines).encode())
                except msgspec.DecodeError:
                    data = {"raw": "\n".join(data_lines)}
                yield StreamEvent(seq=seq, kind=kind, data=data if isinstance(data, dict) else {})
            seq, kind, data_lines = 0, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id" and value.isdigit():
            seq = int(value)
        elif field == "event":
            kind = value
        elif field == "data":
            data_lines.append(value)
