"""One agent's container in rootless Podman: start it, read its output, wait for its
exit, move its workspace in and out, stop and remove it.

One container costs: create and attach (:class:`vigil_executor.podman.PodmanRuntime`;
the attach is a hijacked stream that ends when the agent exits, so no output is lost and
none is polled), start, wait (``interval=10ms``; the default polls every 250 ms),
inspect (OOM flag), delete. See docs/decisions/0002.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import BinaryIO

import aiohttp
import structlog

from vigil_executor.archive import END_OF_ARCHIVE, relative_tar, tar_end
from vigil_executor.isolation import lower_priority
from vigil_executor.podman_api import PodmanAPI
from vigil_executor.podman_errors import (
    INIT_FAILED_EXIT,
    INIT_LINES,
    INIT_OUTPUT_WAIT_S,
    PodmanError,
    init_failure,
)
from vigil_executor.runtime import ArchiveTooLarge, ContainerError, ExitInfo, LineSplitter, Stream

log = structlog.get_logger("vigil.executor.podman")

STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}
RAW_SLACK = 64 * 1024  # see PodmanContainer.export_workspace


class PodmanContainer:
    def __init__(self, api: PodmanAPI, cid: str, attach: aiohttp.ClientResponse,
                 max_line: int, workspace: str, max_archive: int | None = None,
                 nice: int = 0) -> None:
        self.id = cid
        self._nice = nice
        self._api = api
        self._attach = attach
        self._max_line = max_line
        self._workspace = workspace
        self._max_archive = max_archive
        # The first output lines and the count, kept to tell an init that could not start
        # the agent (its messages are all there is) from an agent that ran; see wait().
        self._head: list[str] = []
        self._lines = 0
        self._output_ended = asyncio.Event()

    async def start(self) -> int | None:
        """Run the agent at the spec's nice value. Podman's ``init`` has runc set the
        container up and leaves its first process (``runc init``, in the container's
        namespaces, as its host uid) waiting for ``start`` to exec the container's init:
        it is lowered in that gap, so no instruction of the agent runs at the services'
        priority, and all it starts inherits the value. Podman, conmon and runc are not
        lowered (the Podman service is not niced): the next task's start never queues
        behind a busy agent."""
        nice: int | None = None
        if self._nice:
            await self._api.call("POST", f"/containers/{self.id}/init")
            info = await self._api.call("GET", f"/containers/{self.id}/json")
            state = info.get("State") if isinstance(info, dict) else None
            pid = state.get("Pid") if isinstance(state, dict) else None
            if isinstance(pid, int) and pid > 0:
                nice = lower_priority(pid, self._nice)
        await self._api.call("POST", f"/containers/{self.id}/start")
        return nice

    async def import_workspace(self, archive: BinaryIO) -> None:
        # Podman unpacks into the named volume even before the container first runs. The
        # body is an async generator (not the file): if Podman fails the request early,
        # no background read is left behind on a file we are about to close.
        #
        # The body ends at the end-of-archive marker, without the zero padding tar writers
        # add up to a 10 KiB record: Podman pipes the body into a copier subprocess that
        # stops reading at the marker and exits, and padding written after that fails the
        # whole request with "HTTP 500: passing bulk input to subprocess: write |1: broken
        # pipe" (containers/buildah#6573; a race: measured here, padded bodies failed 3 of
        # 540 imports, all 3 within the first 190 sequential ones, and trimmed bodies 0 of
        # 540; docs/decisions/0008).
        start = archive.tell()
        end = await asyncio.to_thread(tar_end, archive)
        archive.seek(start)

        async def chunks() -> AsyncIterator[bytes]:
            left = end - start if end is not None else None
            while left is None or left > 0:
                size = 256 * 1024 if left is None else min(256 * 1024, left)
                data = await asyncio.to_thread(archive.read, size)
                if not data:
                    break
                if left is not None:
                    left -= len(data)
                yield data
            if end is not None:
                yield END_OF_ARCHIVE

        await self._api.call(
            "PUT", f"/containers/{self.id}/archive", params={"path": self._workspace},
            data=chunks(), headers={"Content-Type": "application/x-tar"}, timeout=600,
        )

    async def export_workspace(self) -> AsyncIterator[bytes]:
        """The workspace as a tar whose members are relative to it.

        Podman's archive of a running container names members ``workspace/...`` and of a
        stopped one ``/...``; both are rewritten to ``...`` so an archive unpacks the same
        into any workspace (and an operator can read it).

        With a size limit, bytes are counted as they arrive and the download stops as soon
        as Podman's archive passes the limit (plus ``RAW_SLACK``: its member names and
        directory entry differ a little from the rewritten archive, whose exact size the
        checkpoint store checks): ``ArchiveTooLarge``, and nothing more is copied.
        """
        cap = None if self._max_archive is None else self._max_archive + RAW_SLACK
        read = 0
        with tempfile.TemporaryFile() as raw, tempfile.TemporaryFile() as clean:
            async for chunk in self._api.stream(
                "GET", f"/containers/{self.id}/archive", params={"path": self._workspace}
            ):
                read += len(chunk)
                if cap is not None and read > cap:
                    assert self._max_archive is not None
                    raise ArchiveTooLarge(read, self._max_archive)
                await asyncio.to_thread(raw.write, chunk)
            raw.seek(0)
            try:
                await asyncio.to_thread(relative_tar, raw, clean,
                                        PurePosixPath(self._workspace).name)
            except tarfile.TarError as exc:
                # Seen in the soak: an empty body when the container stopped under the
                # request. A failed checkpoint (the agent is told), not a crashed attempt.
                raise PodmanError(f"Podman's archive of the workspace is unreadable "
                                  f"({read} bytes): {exc}", cause="archive_unreadable") from exc
            clean.seek(0)
            while data := await asyncio.to_thread(clean.read, 256 * 1024):
                yield data

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """Demultiplex the attach stream: 8-byte headers (stream, 0, 0, 0, uint32 size)."""
        try:
            async for stream, line in self._demultiplexed():
                self._lines += 1
                if len(self._head) < INIT_LINES:
                    self._head.append(line.decode(errors="replace"))
                yield stream, line
        finally:
            self._output_ended.set()

    async def _demultiplexed(self) -> AsyncIterator[tuple[Stream, bytes]]:
        splitters: dict[Stream, LineSplitter] = {
            "stdout": LineSplitter(self._max_line), "stderr": LineSplitter(self._max_line)}
        reader = self._attach.content
        try:
            while True:
                try:
                    header = await reader.readexactly(8)
                except asyncio.IncompleteReadError:
                    break
                kind, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = await reader.readexactly(size) if size else b""
                stream: Stream = STREAMS.get(kind, "stdout")
                for line in splitters[stream].feed(payload):
                    yield stream, line
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.warning("attach_stream_broken", container=self.id[:12], error=str(exc))
        finally:
            self._attach.release()
        for name, splitter in splitters.items():
            for line in splitter.flush():
                yield ("stdout" if name == "stdout" else "stderr"), line

    async def wait(self) -> ExitInfo:
        data = await self._api.call(
            "POST", f"/containers/{self.id}/wait",
            params={"condition": "stopped", "interval": "10ms"}, timeout=None,
        )
        code = int(data) if isinstance(data, int | str) else -1
        info = await self._api.call("GET", f"/containers/{self.id}/json")
        state = info.get("State", {}) if isinstance(info, dict) else {}
        start_error = await self._init_failure() if code == INIT_FAILED_EXIT else None
        return ExitInfo(exit_code=code, oom_killed=bool(state.get("OOMKilled")),
                        start_error=start_error)

    async def _init_failure(self) -> ContainerError | None:
        """Whether the init failed to start the agent: the container's whole output, once
        the attach stream has ended (it may trail the exit a little), is the init's own
        messages. Not the container's log: Podman 4.3 answered ``tail=3`` with a bare
        newline in about one of three tries, catatonit writing its message and the
        newline apart."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._output_ended.wait(), INIT_OUTPUT_WAIT_S)
        if not self._output_ended.is_set() or self._lines > len(self._head):
            return None  # unknown, or the agent printed more than an init would
        return init_failure(self._head)

    async def stop(self, grace_s: float) -> None:
        with contextlib.suppress(PodmanError):
            await self._api.call(
                "POST", f"/containers/{self.id}/stop",
                params={"timeout": str(max(0, int(grace_s)))}, timeout=grace_s + 30,
            )

    async def remove(self) -> None:
        with contextlib.suppress(PodmanError):
            await self._api.call("DELETE", f"/containers/{self.id}", params={"force": "true"})
