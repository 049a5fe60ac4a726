"""The Podman service's REST API (``podman system service``) over its unix socket.

We speak the libpod API with aiohttp instead of using podman-py: podman-py is
``requests``-based (it would need a thread per call) and has no streaming attach. Two
connection pools: one for calls, bounded, and one for the attach streams, which live as
long as their agents. Podman's answers become typed errors
(:mod:`vigil_executor.podman_errors`); an API that cannot be reached is
``RuntimeUnavailable``. See docs/decisions/0002.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from vigil.errors import RuntimeUnavailable
from vigil_executor.podman_errors import error_of

API = "/v4.0.0/libpod"


def socket_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "unix":
        raise RuntimeUnavailable(f"VIGIL_PODMAN_URL must be unix:///path/to/podman.sock, not {url}")
    return parts.path


class PodmanAPI:
    def __init__(self, url: str) -> None:
        self.socket = socket_path(url)
        self.url = url
        self._session: aiohttp.ClientSession | None = None
        self._attach_session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket, limit=64),
            base_url="http://podman",
        )
        # Attach streams live as long as their agents: a pool of their own, unbounded.
        self._attach_session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket, limit=0),
            base_url="http://podman",
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )

    async def close(self) -> None:
        for session in (self._session, self._attach_session):
            if session is not None:
                await session.close()
        self._session = self._attach_session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = 30.0,
        ok: tuple[int, ...] = (200, 201, 204, 304),
    ) -> Any:
        if self._session is None:
            raise RuntimeUnavailable("Podman runtime is not open")
        try:
            async with self._session.request(
                method, API + path, params=params, json=body, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.read()
                if resp.status not in ok:
                    raise error_of(resp.status, body, path)
                if not body:
                    return None
                if resp.content_type == "application/json":
                    return await resp.json(content_type=None)
                return body.decode(errors="replace").strip()
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeUnavailable(
                f"cannot reach the Podman API at {self.url} ({exc}); is `podman system "
                "service` running as the rootless user?"
            ) from exc
        except TimeoutError as exc:
            raise RuntimeUnavailable(f"Podman API timed out on {method} {path}") from exc

    async def stream(self, method: str, path: str, *, params: dict[str, str] | None = None,
                     chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
        """A streamed response body (archives), in chunks; errors as for ``call``."""
        if self._session is None:
            raise RuntimeUnavailable("Podman runtime is not open")
        try:
            async with self._session.request(
                method, API + path, params=params,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            ) as resp:
                if resp.status != 200:
                    raise error_of(resp.status, await resp.read(), path)
                async for data in resp.content.iter_chunked(chunk):
                    yield data
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeUnavailable(f"cannot reach the Podman API at {self.url} ({exc})") from exc

    async def attach(self, cid: str) -> aiohttp.ClientResponse:
        """The container's attach stream (its output from the start, demultiplexed by
        the caller); the response is the caller's to release."""
        assert self._attach_session is not None
        return await self._attach_session.post(
            f"{API}/containers/{cid}/attach",
            params={"stream": "true", "stdout": "true", "stderr": "true", "logs": "true"},
        )
