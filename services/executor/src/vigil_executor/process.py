"""UNSAFE runtimes, for measuring the platform's own overhead and for fast tests.

``process`` runs the task's command as a plain child process of the executor, with no
isolation at all; ``null`` runs nothing and reports success (``false`` as the command's
first word reports exit code 1). Both refuse to start unless ``VIGIL_UNSAFE_RUNTIME=1``,
and the executor logs a warning at start when one is in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from vigil.errors import VigilError
from vigil.messages import ANY_IMAGE
from vigil_executor.runtime import (
    ContainerSpec,
    ExitInfo,
    HostView,
    Leftover,
    LineSplitter,
    Stream,
)


def _tar_dir(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    return buf.getvalue()


def _untar(archive: BinaryIO, root: Path) -> None:
    with tarfile.open(fileobj=archive, mode="r|*") as tar:
        tar.extractall(root, filter="data")


class ProcessContainer:
    def __init__(self, spec: ContainerSpec, workspace: Path, max_line: int) -> None:
        self.id = f"proc-{spec.name}"
        self._spec = spec
        self._workspace = workspace
        self._max_line = max_line
        self._proc: asyncio.subprocess.Process | None = None
        self._started = asyncio.Event()

    async def start(self) -> int | None:
        spec = self._spec
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            **spec.env,
            "VIGIL_WORKSPACE": str(self._workspace),
        }
        if spec.control_dir is not None:
            env["VIGIL_CONTROL_DIR"] = spec.control_dir
        if spec.secrets_dir is not None:  # no mount namespace: the host directory itself
            env["VIGIL_SECRETS_DIR"] = spec.secrets_dir
        self._proc = await asyncio.create_subprocess_exec(
            *spec.command,
            cwd=self._workspace,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.id = f"pid-{self._proc.pid}"
        self._started.set()
        return None  # not lowered: this runtime is for tests and benchmarks only

    async def import_workspace(self, archive: BinaryIO) -> None:
        await asyncio.to_thread(_untar, archive, self._workspace)

    async def export_workspace(self) -> AsyncIterator[bytes]:
        data = await asyncio.to_thread(_tar_dir, self._workspace)
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        await self._started.wait()
        assert self._proc is not None
        queue: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue()

        async def pump(stream: Stream, reader: asyncio.StreamReader | None) -> None:
            splitter = LineSplitter(self._max_line)
            if reader is not None:
                while chunk := await reader.read(65_536):
                    for line in splitter.feed(chunk):
                        await queue.put((stream, line))
            for line in splitter.flush():
                await queue.put((stream, line))
            await queue.put(None)

        pumps = [
            asyncio.create_task(pump("stdout", self._proc.stdout)),
            asyncio.create_task(pump("stderr", self._proc.stderr)),
        ]
        open_streams = 2
        try:
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                yield item
        finally:
            for p in pumps:
                p.cancel()

    async def wait(self) -> ExitInfo:
        await self._started.wait()
        assert self._proc is not None
        code = await self._proc.wait()
        return ExitInfo(exit_code=code if code >= 0 else 128 - code)

    async def stop(self, grace_s: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def remove(self) -> None:
        await self.stop(0)


class _ImagesIgnored:
    """Image calls of a runtime that runs no images (the unsafe test runtimes)."""

    name: str

    async def image_exists(self, image: str) -> bool:
        return True

    async def image_id(self, image: str) -> str | None:
        return None  # the image is ignored

    async def load_image(self, archive: BinaryIO) -> list[str]:
        raise VigilError(f"the {self.name} runtime runs no images; there is nothing to load")

    async def remove_image(self, image: str) -> None:
        pass

    async def images(self) -> list[str]:
        return [ANY_IMAGE]  # the image is ignored: any task's will do


class ProcessRuntime(_ImagesIgnored):
    """Runs the command on the host. No sandbox: never for untrusted agents."""

    name = "process"
    limits_enforced = False
    limits_note = "UNSAFE process runtime: no isolation, no limits"

    def __init__(self, workspace_root: Path | None = None, max_line: int = 16_384) -> None:
        self._root = workspace_root or Path(tempfile.gettempdir()) / "vigil-unsafe-workspaces"
        self._max_line = max_line

    async def open(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        pass


    async def create(self, spec: ContainerSpec) -> ProcessContainer:
        workspace = self._root / spec.workspace_volume
        workspace.mkdir(parents=True, exist_ok=True)
        return ProcessContainer(spec, workspace, self._max_line)

    async def remove_volume(self, name: str) -> None:
        shutil.rmtree(self._root / name, ignore_errors=True)

    async def host_view(self, cid: str, volume: str) -> HostView | None:
        return None  # unsafe: no limits at all (its limits_note says so)

    async def find_containers(self, node_id: str) -> list[Leftover]:
        return []  # child processes die with the executor (their session is killed)

    async def find_volumes(self, node_id: str) -> list[str]:
        return []  # unsafe, for benchmarks: its workspaces live in a temp directory

    async def remove_container(self, cid: str) -> None:
        pass


class NullContainer:
    def __init__(self, exit_code: int) -> None:
        self.id = "null"
        self._code = exit_code

    async def start(self) -> int | None:
        return None

    async def import_workspace(self, archive: BinaryIO) -> None:
        pass

    async def export_workspace(self) -> AsyncIterator[bytes]:
        yield _tar_dir_empty()

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        return
        yield  # pragma: no cover - makes this an async generator

    async def wait(self) -> ExitInfo:
        return ExitInfo(exit_code=self._code)

    async def stop(self, grace_s: float) -> None:
        pass

    async def remove(self) -> None:
        pass


def _tar_dir_empty() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    return buf.getvalue()


class NullRuntime(_ImagesIgnored):
    """Runs nothing: isolates the platform's overhead (scheduling, state, events, acks)."""

    name = "null"
    limits_enforced = False
    limits_note = "UNSAFE null runtime: commands are not run"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass


    async def create(self, spec: ContainerSpec) -> NullContainer:
        return NullContainer(1 if spec.command and spec.command[0] == "false" else 0)

    async def remove_volume(self, name: str) -> None:
        pass

    async def host_view(self, cid: str, volume: str) -> HostView | None:
        return None

    async def find_containers(self, node_id: str) -> list[Leftover]:
        return []

    async def find_volumes(self, node_id: str) -> list[str]:
        return []

    async def remove_container(self, cid: str) -> None:
        pass
