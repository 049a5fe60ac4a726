"""``vigil.Client``: the async Python SDK for the gateway's HTTP API (the CLI uses it).

    async with Client("http://127.0.0.1:8080", token="vgl_…") as client:
        task = await client.submit({"command": ["python3", "-c", "print('hi')"]})
        async for line in client.logs(task["id"], follow=True):
            print(line)
        state = await client.wait(task["id"], timeout_s=600)
        async for summary in client.iter_tasks(status=["failed", "dead"], labels={"team": "x"}):
            print(summary.id, summary.status)

Errors are :class:`vigil.errors.VigilError`: :class:`GatewayError` (an
:class:`~vigil.errors.ApiError` with the gateway's error ``code``) when the gateway
refused a call, a retryable ``VigilError`` when it cannot be reached, :class:`WaitTimeout`
(also a :class:`TimeoutError`) when :meth:`Client.wait` runs out of time.

Idempotent calls (reads, cancel, a submit with an ``Idempotency-Key``) are retried on
429 and 503, honouring ``Retry-After``, at most ``retries`` times. Event streams reconnect on
their own with ``Last-Event-ID``, so a dropped connection neither loses nor repeats an
event; a followed log stream reconnects too, skipping the lines it already yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import msgspec

from vigil import codec
from vigil.api import (
    CancelResponse,
    EnvironmentHistory,
    EnvironmentList,
    ExecutorList,
    SecretBody,
    SecretInfo,
    SecretList,
    TaskList,
    TaskSummary,
)
from vigil.environments import Environment, EnvironmentSpec
from vigil.errors import ApiError, VigilError
from vigil.messages import TaskSpec, TaskState

USER_AGENT = "vigil-client/0.1"
# A Retry-After longer than this is not waited out: the error goes to the caller, who can
# decide (a CLI user would rather see "rate limited, retry in 10 min" than a hang).
MAX_RETRY_AFTER_S = 30.0
# How often a broken stream (events, followed logs) is reopened before giving up.
MAX_RECONNECTS = 10

LogStream = Literal["stdout", "stderr"]


class GatewayError(ApiError):
    """The gateway refused a call: ``status`` (HTTP), ``code`` (stable, e.g. ``not_found``,
    ``finished``, ``rate_limited``), ``field`` (the request field at fault, if any) and
    ``retry_after`` (seconds, from the ``Retry-After`` header, if any)."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, message, field=field)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class WaitTimeout(VigilError, TimeoutError):
    """:meth:`Client.wait` gave up before the task finished; ``state`` is the task's last
    known state (``None`` if it could not be read). The task itself is unaffected."""

    retryable = True

    def __init__(self, task_id: str, timeout_s: float, state: TaskState | None) -> None:
        status = f"still {state.status}" if state is not None else "status unknown"
        super().__init__(
            f"task {task_id} did not finish within {timeout_s:g}s ({status}); wait longer "
            f"(`vigil wait {task_id} --timeout …`) or stop it (`vigil cancel {task_id}`)"
        )
        self.task_id = task_id
        self.timeout_s = timeout_s
        self.state = state


@dataclass(frozen=True)
class StreamEvent:
    """One event of a task's SSE stream. ``id`` is its SSE id, ``<events seq>.<output
    seq>`` (where a reader is in VIGIL_EVENTS and VIGIL_OUTPUT): what resumes after it;
    ``seq`` is its first part."""

    seq: int
    kind: str
    data: dict[str, Any]
    id: str = ""


TimeBound = datetime | str


class Client:
    """An async client of one gateway. Use ``async with`` (or call :meth:`close`).

    ``timeout_s`` bounds each request (not a followed stream); ``retries`` is how many times
    an idempotent call is repeated after 429/503 before the error is raised.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0,
                 retries: int = 3) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
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
            headers = {"User-Agent": USER_AGENT}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    # plumbing -------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, body: bytes | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: list[tuple[str, str]] | None = None,
                       idempotent: bool | None = None) -> tuple[int, Any]:
        """One call, retried on 429/503 (idempotent calls only) as ``Retry-After`` says."""
        if idempotent is None:
            idempotent = method in ("GET", "HEAD")
        attempt = 0
        while True:
            try:
                return await self._request_once(method, path, body=body, headers=headers,
                                                params=params)
            except GatewayError as exc:
                if not idempotent or exc.status not in (429, 503) or attempt >= self._retries:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else 0.5 * 2**attempt
                if delay > MAX_RETRY_AFTER_S:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def _request_once(self, method: str, path: str, *, body: bytes | None,
                            headers: Mapping[str, str] | None,
                            params: list[tuple[str, str]] | None) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, self.url + path, data=body, headers=hdrs,
                                            params=params, timeout=self._timeout) as resp:
                payload = await resp.read()
                if resp.status >= 400:
                    raise _error(resp, payload)
                return resp.status, codec.any_decoder.decode(payload) if payload else None
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from exc
        except TimeoutError as exc:
            raise VigilError(
                f"the gateway at {self.url} did not answer {method} {path} in time; see its "
                "log", retryable=True,
            ) from exc
        except msgspec.DecodeError as exc:
            raise VigilError(f"the gateway at {self.url} answered {method} {path} with "
                             f"something that is not JSON ({exc}); is that URL a Vigil "
                             "gateway?") from exc

    def _unreachable(self, exc: BaseException) -> VigilError:
        return VigilError(
            f"cannot reach the gateway at {self.url} ({exc}); is `vigil up` running, "
            "and is VIGIL_GATEWAY_URL right?", retryable=True,
        )

    # tasks ----------------------------------------------------------------------------------
    async def submit(self, spec: TaskSpec | Mapping[str, Any], *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a task; returns ``{"id", "tenant", "status", "links", …}``.

        Retried on 429/503 only with an ``idempotency_key`` (then a repeat cannot make a
        second task).
        """
        body = codec.encode(spec) if isinstance(spec, TaskSpec) else codec.encode(dict(spec))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        _, data = await self._request("POST", "/v1/tasks", body=body, headers=headers,
                                      idempotent=idempotency_key is not None)
        return dict(data)

    async def get(self, task_id: str) -> TaskState:
        """The task's current state (404 :class:`GatewayError` if there is no such task)."""
        _, data = await self._request("GET", f"/v1/tasks/{task_id}")
        return msgspec.convert(data, TaskState)

    async def confessions(self, task_id: str) -> list[dict[str, Any]]:
        """The confessions on the task's timeline, oldest first."""
        _, data = await self._request("GET", f"/v1/tasks/{task_id}",
                                      params=[("include", "confessions")])
        return list(data.get("confessions", []))

    async def list_tasks(
        self, *, status: str | Iterable[str] | None = None, tenant: str | None = None,
        labels: Mapping[str, str] | None = None, created_after: TimeBound | None = None,
        created_before: TimeBound | None = None, limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskList:
        """One page of tasks, newest first. ``status`` is one status or several (any of
        them matches); every label must match; ``created_after``/``created_before`` are
        datetimes (naive ones are UTC) or RFC 3339 strings; ``limit`` is 1-500 (default 50).
        Pass the answer's ``next_cursor`` as ``cursor`` for the next page."""
        params = _list_params(status=status, tenant=tenant, labels=labels,
                              created_after=created_after, created_before=created_before)
        if limit is not None:
            params.append(("limit", str(limit)))
        if cursor:
            params.append(("cursor", cursor))
        _, data = await self._request("GET", "/v1/tasks", params=params)
        return msgspec.convert(data, TaskList)

    async def iter_tasks(
        self, *, status: str | Iterable[str] | None = None, tenant: str | None = None,
        labels: Mapping[str, str] | None = None, created_after: TimeBound | None = None,
        created_before: TimeBound | None = None, page_size: int | None = None,
        cursor: str | None = None,
    ) -> AsyncIterator[TaskSummary]:
        """Every matching task, newest first, following cursors page by page."""
        while True:
            page = await self.list_tasks(status=status, tenant=tenant, labels=labels,
                                         created_after=created_after,
                                         created_before=created_before, limit=page_size,
                                         cursor=cursor)
            for task in page.tasks:
                yield task
            if not page.next_cursor or not page.tasks:
                return
            cursor = page.next_cursor

    async def cancel(self, task_id: str, reason: str | None = None) -> CancelResponse:
        """Ask for the task to be cancelled. A queued task ends ``cancelled`` at once; a
        running one once its executor has stopped the agent (see :meth:`wait`).

        Cancelling twice is harmless (so this is retried on 429/503). A task that already
        finished raises :class:`GatewayError` with status 409 and code ``finished``.
        """
        body = codec.encode({"reason": reason}) if reason else None
        _, data = await self._request("POST", f"/v1/tasks/{task_id}/cancel", body=body,
                                      idempotent=True)
        return msgspec.convert(data, CancelResponse)

    async def logs(self, task_id: str, *, follow: bool = False,
                   stream: LogStream | None = None) -> AsyncIterator[str]:
        """The task's output, one line at a time (without the newline).

        With ``follow`` the lines keep coming until the task finishes. A followed stream
        that breaks (or that the gateway closes while the task is still going, e.g. on a
        restart) is reopened, and the lines already yielded are skipped: the log of a task
        is append-only, so counting lines is enough to resume exactly.
        """
        params: list[tuple[str, str]] = []
        if follow:
            params.append(("follow", "1"))
        if stream:
            params.append(("stream", stream))
        yielded = 0
        failures = 0
        connected = False
        while True:
            skip = yielded
            try:
                async with self.session.get(
                    f"{self.url}/v1/tasks/{task_id}/logs", params=params,
                    headers={"Accept": "text/plain"},
                    timeout=_stream_timeout(follow, self._timeout),
                ) as resp:
                    connected = True
                    if resp.status >= 400:
                        error = _error(resp, await resp.read())
                        if not _should_retry(error, failures, self._retries):
                            raise error
                        failures += 1
                        await asyncio.sleep(_backoff(failures, error.retry_after))
                        continue
                    async for line in _lines(resp.content):
                        if skip:
                            skip -= 1
                            continue
                        failures = 0
                        yielded += 1
                        yield line
            except (TimeoutError, aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError) as exc:
                failures += 1
                if not connected and isinstance(exc, aiohttp.ClientConnectorError):
                    raise self._unreachable(exc) from exc
                if failures > MAX_RECONNECTS:
                    raise VigilError(f"log stream of task {task_id} broke: {exc}",
                                     retryable=True) from exc
                await asyncio.sleep(_backoff(failures))
                continue
            if not follow:
                return
            # A clean end: the gateway ends a followed log when the task is over, but it
            # also closes streams when it shuts down. Only the task's state can tell.
            if (await self.get(task_id)).terminal:
                return
            failures += 1
            if failures > MAX_RECONNECTS:
                raise VigilError(f"log stream of task {task_id} keeps ending early",
                                 retryable=True)
            await asyncio.sleep(_backoff(failures))

    async def events(self, task_id: str, last_event_id: int | str | None = None,
                     *, reconnect: bool = True) -> AsyncIterator[StreamEvent]:
        """Yield the task's events until its final ``finished`` event."""
        last = last_event_id
        failures = 0
        connected = False
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self.session.get(
                    f"{self.url}/v1/tasks/{task_id}/events", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
                ) as resp:
                    connected = True
                    if resp.status >= 400:
                        error = _error(resp, await resp.read())
                        if not reconnect or not _should_retry(error, failures, self._retries):
                            raise error
                        failures += 1
                        await asyncio.sleep(_backoff(failures, error.retry_after))
                        continue
                    async for event in _parse_sse(resp.content):
                        failures = 0
                        last = event.id or last
                        yield event
                        if event.kind == "finished" and event.data.get("final", True):
                            return
                # The server ended the stream before the final event (it restarted, or a
                # proxy cut it): resume after the last event seen.
                failures += 1
                if not reconnect or failures > MAX_RECONNECTS:
                    raise VigilError(f"event stream for {task_id} ended early", retryable=True)
                await asyncio.sleep(_backoff(failures))
                continue
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                failures += 1
                if not connected and isinstance(exc, aiohttp.ClientConnectorError):
                    raise self._unreachable(exc) from exc
                if not reconnect or failures > MAX_RECONNECTS:
                    raise VigilError(f"event stream for {task_id} broke: {exc}",
                                     retryable=True) from exc
                await asyncio.sleep(_backoff(failures))

    async def wait(self, task_id: str, timeout_s: float | None = None) -> TaskState:
        """Wait until the task reaches a final state; return it.

        Raises :class:`WaitTimeout` (a ``TimeoutError``) after ``timeout_s`` seconds; the
        task keeps running.
        """
        try:
            async with asyncio.timeout(timeout_s):
                state = await self.get(task_id)
                if state.terminal:
                    return state
                async for _ in self.events(task_id):
                    pass
                return await self.get(task_id)
        except TimeoutError as exc:
            if isinstance(exc, VigilError) or timeout_s is None:
                raise
        last: TaskState | None = None
        with contextlib.suppress(VigilError, TimeoutError):
            async with asyncio.timeout(5.0):
                last = await self.get(task_id)
        if last is not None and last.terminal:
            return last  # it ended just as time ran out
        raise WaitTimeout(task_id, timeout_s, last)

    # environments -----------------------------------------------------------------------------
    async def environments(self) -> list[Environment]:
        """The tenant's persistent environments, by name."""
        _, data = await self._request("GET", "/v1/environments")
        return msgspec.convert(data, EnvironmentList).environments

    async def environment(self, name: str) -> Environment:
        """One environment (404 :class:`GatewayError` if the tenant has none of that name)."""
        _, data = await self._request("GET", f"/v1/environments/{name}")
        return msgspec.convert(data, Environment)

    async def put_environment(self, name: str, spec: EnvironmentSpec | Mapping[str, Any]
                              ) -> tuple[Environment, bool]:
        """Create the environment or change its settings (its workspace is kept); the
        environment, and whether it was created. Repeating it changes nothing more, so it
        is retried on 429/503."""
        body = codec.encode(spec) if isinstance(spec, EnvironmentSpec) else codec.encode(
            dict(spec))
        status, data = await self._request("PUT", f"/v1/environments/{name}", body=body,
                                           idempotent=True)
        return msgspec.convert(data, Environment), status == 201

    async def environment_history(self, name: str) -> EnvironmentHistory:
        """Its current revision and the snapshots it keeps, newest first."""
        _, data = await self._request("GET", f"/v1/environments/{name}/history")
        return msgspec.convert(data, EnvironmentHistory)

    async def restore_environment(self, name: str, revision: int) -> Environment:
        """Make the snapshot of ``revision`` current again, as a new revision. Not retried
        on 429/503 (a repeat would add another revision)."""
        _, data = await self._request("POST", f"/v1/environments/{name}/restore",
                                      body=codec.encode({"revision": revision}))
        return msgspec.convert(data, Environment)

    async def delete_environment(self, name: str) -> None:
        """Delete the environment and its snapshots (operator role)."""
        await self._request("DELETE", f"/v1/environments/{name}", idempotent=True)

    # fleet ------------------------------------------------------------------------------------
    async def executors(self) -> ExecutorList:
        """The live executors (those that advertised within the registry's 15 s TTL), by
        pool then node: slots, running, free, labels, draining. ``tenants`` counts only the
        caller's own tenant's running tasks. Needs the viewer role."""
        _, data = await self._request("GET", "/v1/executors")
        return msgspec.convert(data, ExecutorList)

    # secrets ----------------------------------------------------------------------------------
    async def set_secret(self, name: str, value: str) -> SecretInfo:
        """Create or replace the tenant's secret ``name`` (operator role); the answer is
        its metadata. The value is sealed by the gateway and never shown again."""
        body = codec.encode(SecretBody(value=value))
        _, data = await self._request("PUT", f"/v1/secrets/{quote(name, safe='')}",
                                      body=body, idempotent=True)
        return msgspec.convert(data, SecretInfo)

    async def secrets(self) -> SecretList:
        """The tenant's secrets: names and metadata, never values (operator role)."""
        _, data = await self._request("GET", "/v1/secrets")
        return msgspec.convert(data, SecretList)

    async def secret(self, name: str) -> SecretInfo:
        """One secret's metadata (404 :class:`GatewayError` if the tenant has none)."""
        _, data = await self._request("GET", f"/v1/secrets/{quote(name, safe='')}")
        return msgspec.convert(data, SecretInfo)

    async def delete_secret(self, name: str) -> None:
        """Remove the tenant's secret ``name`` (404 if there is none)."""
        await self._request("DELETE", f"/v1/secrets/{quote(name, safe='')}", idempotent=True)

    # incidents --------------------------------------------------------------------------------
    async def incidents(self, **filters: str) -> list[dict[str, Any]]:
        """Incidents (filters: status, severity, tenant), newest activity first."""
        params = [(k, v) for k, v in filters.items() if v]
        _, data = await self._request("GET", "/v1/incidents", params=params)
        return list(data["incidents"])

    async def incident(self, incident_id: str) -> dict[str, Any]:
        _, data = await self._request("GET", f"/v1/incidents/{incident_id}")
        return dict(data)

    async def incident_action(self, incident_id: str, action: str) -> dict[str, Any]:
        """``action`` is ``ack`` or ``resolve`` (operator role)."""
        _, data = await self._request("POST", f"/v1/incidents/{incident_id}/{action}",
                                      idempotent=True)
        return dict(data)

    async def health(self) -> dict[str, Any]:
        _, data = await self._request("GET", "/healthz")
        return dict(data)


# helpers ------------------------------------------------------------------------------------
def _list_params(*, status: str | Iterable[str] | None, tenant: str | None,
                 labels: Mapping[str, str] | None, created_after: TimeBound | None,
                 created_before: TimeBound | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if status:
        statuses = [status] if isinstance(status, str) else list(status)
        params.append(("status", ",".join(statuses)))
    if tenant:
        params.append(("tenant", tenant))
    for key, value in (labels or {}).items():
        params.append(("label", f"{key}={value}"))
    if created_after is not None:
        params.append(("created_after", rfc3339(created_after)))
    if created_before is not None:
        params.append(("created_before", rfc3339(created_before)))
    return params


def rfc3339(when: TimeBound) -> str:
    """``when`` as RFC 3339 (UTC, ``Z``); strings pass through as they are."""
    if isinstance(when, str):
        return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _error(resp: aiohttp.ClientResponse, payload: bytes) -> GatewayError:
    """The gateway's ``{"error": {code, message, field}}`` (or whatever a proxy sent)."""
    code, message, field = "", "", None
    try:
        data = codec.any_decoder.decode(payload) if payload else None
    except msgspec.DecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or "")
        message = str(err.get("message") or "")
        field = err.get("field") if isinstance(err.get("field"), str) else None
    if not message:
        text = payload.decode("utf-8", "replace").strip()[:200]
        message = text or resp.reason or "error"
    return GatewayError(resp.status, code or _default_code(resp.status), message, field=field,
                        retry_after=_retry_after(resp.headers.get("Retry-After")))


def _default_code(status: int) -> str:
    return {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
            409: "conflict", 429: "rate_limited", 503: "unavailable"}.get(status, "error")


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` is seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _should_retry(error: GatewayError, failures: int, limit: int) -> bool:
    """Whether a refused stream request is worth repeating (429/503, a short wait)."""
    return (error.status in (429, 503) and failures < limit
            and (error.retry_after or 0.0) <= MAX_RETRY_AFTER_S)


def _backoff(failures: int, retry_after: float | None = None) -> float:
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return float(min(0.2 * 2**failures, 5.0))


def _stream_timeout(follow: bool, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    if not follow:
        return base
    # A followed log may be quiet for long stretches; the gateway's keep-alives are not
    # visible at this level, so only connecting is bounded.
    return aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Split a body into lines, whatever their length: aiohttp's ``readline`` (and
    iterating a response's content) fails a line over 64 KiB, and an SSE event's data
    line is a whole log batch. A last line without a newline is yielded too. Each chunk
    is searched once, so a long line costs what it holds, not its square."""
    pending: list[bytes] = []
    async for chunk in content.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            yield b"".join(pending).decode("utf-8", errors="replace").removesuffix("\r")
            pending = []
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending).decode("utf-8", errors="replace").removesuffix("\r")


async def _parse_sse(content: aiohttp.StreamReader) -> AsyncIterator[StreamEvent]:
    seq, kind, event_id = 0, "message", ""
    data_lines: list[str] = []
    async for line in _lines(content):
        if not line:
            if data_lines:
                try:
                    data = codec.any_decoder.decode("\n".join(data_lines).encode())
                except msgspec.DecodeError:
                    data = {"raw": "\n".join(data_lines)}
                yield StreamEvent(seq=seq, kind=kind, data=data if isinstance(data, dict) else {},
                                  id=event_id)
            seq, kind, event_id, data_lines = 0, "message", "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
            first = value.partition(".")[0]
            seq = int(first) if first.isascii() and first.isdigit() else 0
        elif field == "event":
            kind = value
        elif field == "data":
            data_lines.append(value)
