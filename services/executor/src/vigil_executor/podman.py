"""Rootless Podman through its REST API (``podman system service``), fully async.

We speak the libpod API with aiohttp over the unix socket instead of using podman-py:
podman-py is ``requests``-based (it would need a thread per call) and has no streaming
attach. One container costs: create, attach (a hijacked stream that ends when the agent
exits, so no output is lost and none is polled), start, wait (``interval=10ms``; the
default polls every 250 ms), inspect (OOM flag), delete. See docs/decisions/0002.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import aiohttp
import structlog

from vigil.errors import ImageNotFound, RuntimeUnavailable
from vigil.messages import MAX_ADVERTISED_IMAGES
from vigil_executor.archive import END_OF_ARCHIVE, relative_tar, tar_end
from vigil_executor.isolation import Isolation, lower_priority
from vigil_executor.podman_errors import (
    INIT_FAILED_EXIT,
    INIT_LINES,
    INIT_OUTPUT_WAIT_S,
    PodmanConflict,
    PodmanError,
    error_of,
    init_failure,
)
from vigil_executor.runtime import (
    CONTROL_PATH,
    LABEL_ATTEMPT,
    LABEL_EXECUTOR,
    LABEL_MANAGED,
    LABEL_TASK,
    LABEL_TENANT,
    RELAY_PATH,
    SECRETS_PATH,
    ArchiveTooLarge,
    ContainerError,
    ContainerSpec,
    ExitInfo,
    HostView,
    Leftover,
    LineSplitter,
    Stream,
)

log = structlog.get_logger("vigil.executor.podman")

API = "/v4.0.0/libpod"
STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}
RAW_SLACK = 64 * 1024  # see PodmanContainer.export_workspace


def socket_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "unix":
        raise RuntimeUnavailable(f"VIGIL_PODMAN_URL must be unix:///path/to/podman.sock, not {url}")
    return parts.path


class PodmanContainer:
    def __init__(self, rt: PodmanRuntime, cid: str, attach: aiohttp.ClientResponse,
                 max_line: int, workspace: str, max_archive: int | None = None,
                 nice: int = 0) -> None:
        self.id = cid
        self._nice = nice
        self._rt = rt
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
            await self._rt.call("POST", f"/containers/{self.id}/init")
            info = await self._rt.call("GET", f"/containers/{self.id}/json")
            state = info.get("State") if isinstance(info, dict) else None
            pid = state.get("Pid") if isinstance(state, dict) else None
            if isinstance(pid, int) and pid > 0:
                nice = lower_priority(pid, self._nice)
        await self._rt.call("POST", f"/containers/{self.id}/start")
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

        await self._rt.call(
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
            async for chunk in self._rt.stream(
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
        data = await self._rt.call(
            "POST", f"/containers/{self.id}/wait",
            params={"condition": "stopped", "interval": "10ms"}, timeout=None,
        )
        code = int(data) if isinstance(data, int | str) else -1
        info = await self._rt.call("GET", f"/containers/{self.id}/json")
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
            await self._rt.call(
                "POST", f"/containers/{self.id}/stop",
                params={"timeout": str(max(0, int(grace_s)))}, timeout=grace_s + 30,
            )

    async def remove(self) -> None:
        with contextlib.suppress(PodmanError):
            await self._rt.call("DELETE", f"/containers/{self.id}", params={"force": "true"})


class PodmanRuntime:
    name = "podman"

    def __init__(self, url: str, *, max_line: int = 16_384, oci_runtime: str = "runc",
                 max_archive_bytes: int | None = None) -> None:
        self._path = socket_path(url)
        self._url = url
        self._max_line = max_line
        self._max_archive = max_archive_bytes
        self._oci_runtime = oci_runtime
        self._session: aiohttp.ClientSession | None = None
        self._attach_session: aiohttp.ClientSession | None = None
        self._limits_enforced = False
        self._limits_note = ""
        self.info: dict[str, Any] = {}
        # Set by the executor once it has prepared it (vigil_executor.isolation).
        self.isolation = Isolation()

    @property
    def socket(self) -> str:
        return self._path

    @property
    def limits_enforced(self) -> bool:
        return self._limits_enforced

    @property
    def limits_note(self) -> str:
        return self._limits_note

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._path, limit=64),
            base_url="http://podman",
        )
        # Attach streams live as long as their agents: a pool of their own, unbounded.
        self._attach_session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._path, limit=0),
            base_url="http://podman",
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )
        try:
            self.info = await self.call("GET", "/info")
        except BaseException:
            await self.close()
            raise
        host = self.info.get("host", {})
        security = host.get("security", {})
        if not security.get("rootless", False):
            await self.close()
            raise PodmanError(
                f"the Podman service at {self._url} runs as root; Vigil runs agents only in "
                "rootless Podman. Start `podman system service` as an unprivileged user."
            )
        version = host.get("cgroupVersion", "")
        controllers = set(host.get("cgroupControllers") or [])
        if version == "v2" and {"memory", "pids"} <= controllers:
            self._limits_enforced = True
            self._limits_note = "cgroup v2 with delegated controllers: limits enforced"
        else:
            self._limits_enforced = False
            self._limits_note = (
                f"cgroup {version or 'unknown'} rootless: memory/CPU/pids limits cannot be "
                "enforced by cgroups on this host; the executor's watchdog measures each "
                "agent (memory, processes, workspace size) and stops it past its limits; "
                "CPU is not limited; rlimits (nofile, nproc, data) apply"
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
                f"cannot reach the Podman API at {self._url} ({exc}); is `podman system "
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
            raise RuntimeUnavailable(f"cannot reach the Podman API at {self._url} ({exc})") from exc

    async def image_exists(self, image: str) -> bool:
        # (A missing image is Podman's 404 "failed to find image", which error_of types
        # as ImageNotFound, not as a PodmanError.)
        try:
            await self.call("GET", f"/images/{quote(image, safe='')}/exists", ok=(204,))
        except (PodmanError, ImageNotFound):
            return False
        return True

    async def image_id(self, image: str) -> str | None:
        try:
            data = await self.call("GET", f"/images/{quote(image, safe='')}/json")
        except (PodmanError, ImageNotFound):
            return None
        found = data.get("Id") if isinstance(data, dict) else None
        return str(found) if found else None

    async def load_image(self, archive: BinaryIO) -> list[str]:
        """``POST /images/load`` with the archive streamed from the file (an image may be
        gigabytes); Podman answers with the names it loaded."""
        archive.seek(0)

        async def chunks() -> AsyncIterator[bytes]:
            while data := await asyncio.to_thread(archive.read, 1024 * 1024):
                yield data

        answer = await self.call("POST", "/images/load", data=chunks(),
                                 headers={"Content-Type": "application/x-tar"}, timeout=1800)
        names = answer.get("Names") if isinstance(answer, dict) else None
        return [str(n) for n in names or []]

    async def remove_image(self, image: str) -> None:
        with contextlib.suppress(PodmanError):
            await self.call("DELETE", f"/images/{quote(image, safe='')}",
                            params={"force": "true"}, ok=(200, 404))

    async def images(self) -> list[str] | None:
        """Every name (``repo:tag``) of every image in this user's storage, sorted; None
        past MAX_ADVERTISED_IMAGES names (then placement does not judge by image)."""
        data = await self.call("GET", "/images/json")
        return image_names(data or [])

    def create_body(self, spec: ContainerSpec) -> dict[str, Any]:
        limits = spec.limits
        body: dict[str, Any] = {
            "name": spec.name,
            "image": spec.image,
            "command": spec.command,
            "env": spec.env,
            "labels": {**spec.labels, LABEL_MANAGED: "1"},
            "hostname": "agent",
            "work_dir": spec.workspace_path,
            # The sandbox: no network, read-only root with private writable tmpfs scratch
            # (spec.tmpfs), no capabilities, no privilege escalation, runc (crun fails on
            # hybrid cgroups here).
            "netns": {"nsmode": "none"},
            "read_only_filesystem": True,
            # Podman 4.3's API ignores this (its CLI adds the mounts itself; measured
            # here, /tmp and /run stayed read-only either way): the tmpfs mounts below are
            # explicit and sized, and a Podman that honours it adds no others.
            "read_only_tmpfs": False,
            "cap_drop": ["all"],
            "no_new_privileges": True,
            "oci_runtime": self._oci_runtime,
            "volumes": [{"Name": spec.workspace_volume, "Dest": spec.workspace_path}],
            "mounts": [
                *({"destination": path, "source": "tmpfs", "type": "tmpfs",
                   "options": ["rw", "nosuid", "nodev", f"size={spec.tmpfs_mb}m",
                               "mode=1777"]} for path in spec.tmpfs),
                *([] if spec.control_dir is None else [{
                    "destination": CONTROL_PATH, "source": spec.control_dir, "type": "bind",
                    "options": ["ro", "rbind", "nosuid", "nodev", "noexec"],
                }]),
                # The egress relay: a program, so not noexec (nor in the control mount).
                *([] if spec.relay is None else [{
                    "destination": RELAY_PATH, "source": spec.relay, "type": "bind",
                    "options": ["ro", "rbind", "nosuid", "nodev"],
                }]),
                *([] if spec.secrets_dir is None else [{
                    "destination": SECRETS_PATH, "source": spec.secrets_dir, "type": "bind",
                    "options": ["ro", "rbind", "nosuid", "nodev", "noexec"],
                }]),
            ],
            "log_configuration": {"driver": "k8s-file"},
            "stop_timeout": max(1, int(spec.stop_grace_s)),
            # An init as PID 1 (catatonit) forwards SIGTERM to the agent: an agent with no
            # handler of its own is PID 1 otherwise, ignores it, and every drain ends in
            # SIGKILL without the grace period it was promised.
            "init": True,
            # Podman kills the agent on its own if the executor is gone past the deadline.
            "timeout": int(spec.timeout_s + spec.stop_grace_s + 60),
            "r_limits": [
                {"type": "nofile", "soft": limits.nofile, "hard": limits.nofile},
                {"type": "nproc", "soft": limits.nproc, "hard": limits.nproc},
            ],
        }
        isolation = self.isolation
        if isolation.userns_size:
            # Podman 4.3's API ignores ``userns`` alone (measured: the container ran as
            # the Podman user); the id mappings are what it acts on.
            body["userns"] = {"nsmode": "auto", "value": f"size={isolation.userns_size}"}
            body["idmappings"] = {"AutoUserNs": True,
                                  "AutoUserNsOpts": {"Size": isolation.userns_size}}
        if isolation.seccomp_path is not None:
            body["seccomp_profile_path"] = isolation.seccomp_path
        if self._limits_enforced:
            resources: dict[str, Any] = {
                "pids": {"limit": limits.pids},
                "memory": {"limit": limits.memory_mb * 1024 * 1024},
            }
            if limits.cpus > 0:
                period = 100_000
                resources["cpu"] = {"quota": int(limits.cpus * period), "period": period}
            body["resource_limits"] = resources
        else:
            # No cgroup limits here: the executor's watchdog enforces the task's memory
            # (all its processes' PSS). The data segment is capped too, per process, as the
            # backstop against one process outrunning a sample: half again the limit, so
            # that a process growing past the limit is the watchdog's (a precise
            # memory_limit outcome), not a malloc failure (RLIMIT_DATA counts reserved,
            # not touched, memory). runc itself needs more than 64 MiB: never below 128.
            data = max(limits.memory_mb * 3 // 2, 128) * 1024 * 1024
            body["r_limits"].append({"type": "data", "soft": data, "hard": data})
        return body

    async def create(self, spec: ContainerSpec) -> PodmanContainer:
        body = self.create_body(spec)
        await self._create_volume(spec)
        try:
            created = await self.call("POST", "/containers/create", body=body)
        except PodmanConflict:
            # A container of that name: left by a crashed earlier life of this node's
            # executor (the name holds node, task and attempt). Remove it only if its
            # labels say so; never someone else's.
            other = await self.call("GET", f"/containers/{quote(spec.name)}/json")
            labels = ((other or {}).get("Config") or {}).get("Labels") or {}
            if labels.get(LABEL_EXECUTOR) != spec.labels.get(LABEL_EXECUTOR):
                raise
            await self.call("DELETE", f"/containers/{quote(spec.name)}",
                            params={"force": "true"}, ok=(200, 204, 404))
            created = await self.call("POST", "/containers/create", body=body)
        cid = created["Id"]
        assert self._attach_session is not None
        try:
            attach = await asyncio.wait_for(self._attach_session.post(
                f"{API}/containers/{cid}/attach",
                params={"stream": "true", "stdout": "true", "stderr": "true", "logs": "true"},
            ), 30)
            if attach.status != 200:
                text = await attach.text()
                attach.release()
                raise error_of(attach.status, text.encode(), "attach")
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.call("DELETE", f"/containers/{cid}", params={"force": "true"})
            raise RuntimeUnavailable("the Podman API did not answer an attach in 30s") from None
        except BaseException:
            with contextlib.suppress(Exception):
                await self.call("DELETE", f"/containers/{cid}", params={"force": "true"})
            raise
        return PodmanContainer(self, cid, attach, self._max_line, spec.workspace_path,
                               self._max_archive, spec.nice)

    async def _create_volume(self, spec: ContainerSpec) -> None:
        """The workspace volume, created before its container and labelled like it. Podman
        would create it implicitly, without labels: then a volume whose container was gone
        (the executor killed between removing the one and the other, or before creating
        the container) was nobody's, for ever. Labelled, a restarted executor finds it."""
        body = {"Name": spec.workspace_volume, "Label": {**spec.labels, LABEL_MANAGED: "1"}}
        try:
            await self.call("POST", "/volumes/create", body=body)
        except PodmanConflict:
            # Left by an earlier life of this node (the name holds node, task and attempt;
            # an older executor made it without labels). A workspace is only ever carried
            # by a checkpoint, never by a leftover volume: replace it, if it is ours.
            other = await self.call("GET", f"/volumes/{quote(spec.workspace_volume)}/json")
            owner = ((other or {}).get("Labels") or {}).get(LABEL_EXECUTOR)
            if owner not in (None, spec.labels.get(LABEL_EXECUTOR)):
                raise
            await self.call("DELETE", f"/volumes/{quote(spec.workspace_volume)}",
                            params={"force": "true"}, ok=(204, 404))
            await self.call("POST", "/volumes/create", body=body)

    async def find_volumes(self, node_id: str) -> list[str]:
        # One label in the filter, and both checked here: Podman 4.3 ORs the label
        # filters of volumes (it ANDs those of containers), so managed=1 plus executor=X
        # listed every node's volumes, and a starting executor removed them all, live
        # agents' included (a forced volume removal removes its container too).
        filters = json.dumps({"label": [f"{LABEL_EXECUTOR}={node_id}"]})
        data = await self.call("GET", "/volumes/json", params={"filters": filters})
        return [str(v["Name"]) for v in data or []
                if _ours(v.get("Labels"), node_id) and v.get("Name")]

    async def remove_volume(self, name: str) -> None:
        with contextlib.suppress(PodmanError):
            await self.call("DELETE", f"/volumes/{quote(name)}", params={"force": "true"},
                            ok=(204, 404))

    async def host_view(self, cid: str, volume: str) -> HostView | None:
        """The container's init pid (``State.Pid``, in the host's pid namespace) and the
        volume's ``Mountpoint``: two inspects, once per attempt."""
        answers: tuple[Any, Any] = await asyncio.gather(
            self.call("GET", f"/containers/{cid}/json"),
            self.call("GET", f"/volumes/{quote(volume)}/json"), return_exceptions=True)
        info, vol = answers
        state = info.get("State") if isinstance(info, dict) else None
        pid = state.get("Pid") if isinstance(state, dict) else None
        mount = vol.get("Mountpoint") if isinstance(vol, dict) else None
        running = not (isinstance(state, dict) and state.get("Running") is False)
        return HostView(pid=int(pid) if isinstance(pid, int) and pid > 0 else None,
                        workspace=str(mount) if mount else None, running=running)

    async def find_containers(self, node_id: str) -> list[Leftover]:
        """Containers this node's executor created (running or not), by label."""
        filters = json.dumps({"label": [f"{LABEL_MANAGED}=1", f"{LABEL_EXECUTOR}={node_id}"]})
        data = await self.call("GET", "/containers/json", params={"all": "true",
                                                                  "filters": filters})
        found = []
        for c in data or []:
            labels = c.get("Labels") or {}
            if not _ours(labels, node_id):
                continue  # never trust a filter's semantics with a removal
            found.append(Leftover(
                id=c.get("Id", ""), task_id=labels.get(LABEL_TASK, ""),
                attempt=int(labels.get(LABEL_ATTEMPT, "0") or 0),
                state=str(c.get("State", "")), tenant=labels.get(LABEL_TENANT, ""),
            ))
        return found

    async def remove_container(self, cid: str) -> None:
        await self.call("DELETE", f"/containers/{cid}", params={"force": "true", "t": "0"},
                        ok=(200, 204, 404))


def _ours(labels: Any, node_id: str) -> bool:
    """Whether an object's labels say this node's executor made it."""
    return (isinstance(labels, dict) and labels.get(LABEL_MANAGED) == "1"
            and labels.get(LABEL_EXECUTOR) == node_id)


def image_names(listing: list[dict[str, Any]]) -> list[str] | None:
    """The names in a ``GET /images/json`` answer (``RepoTags``, and libpod's ``Names``),
    without untagged ones, sorted; None past MAX_ADVERTISED_IMAGES."""
    names = {str(name) for image in listing
             for name in [*(image.get("RepoTags") or ()), *(image.get("Names") or ())]
             if name and not str(name).startswith("<none>")}
    if len(names) > MAX_ADVERTISED_IMAGES:
        log.warning("too_many_images", names=len(names), limit=MAX_ADVERTISED_IMAGES,
                    note="advertising none: placement will not judge this node by image")
        return None
    return sorted(names)
