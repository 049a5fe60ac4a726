"""Rootless Podman as the executor's container runtime, through its REST API.

:class:`PodmanRuntime` checks the service (rootless, which limits cgroups can enforce),
builds each agent's sandbox (the container's create body), creates containers and their
labelled workspace volumes, loads and lists images, and finds what an earlier life of
this node left behind. The HTTP client is :mod:`vigil_executor.podman_api`; one
container's operations are :mod:`vigil_executor.podman_container`. See
docs/decisions/0002.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, BinaryIO
from urllib.parse import quote

import structlog

from vigil.errors import ImageNotFound, RuntimeUnavailable
from vigil.messages import MAX_ADVERTISED_IMAGES
from vigil_executor.isolation import Isolation
from vigil_executor.podman_api import PodmanAPI
from vigil_executor.podman_container import PodmanContainer
from vigil_executor.podman_errors import PodmanConflict, PodmanError, error_of
from vigil_executor.runtime import (
    CONTROL_PATH,
    LABEL_ATTEMPT,
    LABEL_EXECUTOR,
    LABEL_MANAGED,
    LABEL_TASK,
    LABEL_TENANT,
    RELAY_PATH,
    SECRETS_PATH,
    ContainerSpec,
    HostView,
    Leftover,
)

log = structlog.get_logger("vigil.executor.podman")


class PodmanRuntime:
    name = "podman"

    def __init__(self, url: str, *, max_line: int = 16_384, oci_runtime: str = "runc",
                 max_archive_bytes: int | None = None) -> None:
        self.api = PodmanAPI(url)
        self._max_line = max_line
        self._max_archive = max_archive_bytes
        self._oci_runtime = oci_runtime
        self._limits_enforced = False
        self._limits_note = ""
        self.info: dict[str, Any] = {}
        # Set by the executor once it has prepared it (vigil_executor.isolation).
        self.isolation = Isolation()

    @property
    def socket(self) -> str:
        return self.api.socket

    @property
    def limits_enforced(self) -> bool:
        return self._limits_enforced

    @property
    def limits_note(self) -> str:
        return self._limits_note

    async def open(self) -> None:
        self.api.open()
        try:
            self.info = await self.api.call("GET", "/info")
        except BaseException:
            await self.close()
            raise
        host = self.info.get("host", {})
        security = host.get("security", {})
        if not security.get("rootless", False):
            await self.close()
            raise PodmanError(
                f"the Podman service at {self.api.url} runs as root; Vigil runs agents only in "
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
        await self.api.close()

    async def image_exists(self, image: str) -> bool:
        # (A missing image is Podman's 404 "failed to find image", which error_of types
        # as ImageNotFound, not as a PodmanError.)
        try:
            await self.api.call("GET", f"/images/{quote(image, safe='')}/exists", ok=(204,))
        except (PodmanError, ImageNotFound):
            return False
        return True

    async def image_id(self, image: str) -> str | None:
        try:
            data = await self.api.call("GET", f"/images/{quote(image, safe='')}/json")
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

        answer = await self.api.call("POST", "/images/load", data=chunks(),
                                 headers={"Content-Type": "application/x-tar"}, timeout=1800)
        names = answer.get("Names") if isinstance(answer, dict) else None
        return [str(n) for n in names or []]

    async def remove_image(self, image: str) -> None:
        with contextlib.suppress(PodmanError):
            await self.api.call("DELETE", f"/images/{quote(image, safe='')}",
                            params={"force": "true"}, ok=(200, 404))

    async def images(self) -> list[str] | None:
        """Every name (``repo:tag``) of every image in this user's storage, sorted; None
        past MAX_ADVERTISED_IMAGES names (then placement does not judge by image)."""
        data = await self.api.call("GET", "/images/json")
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
            created = await self.api.call("POST", "/containers/create", body=body)
        except PodmanConflict:
            # A container of that name: left by a crashed earlier life of this node's
            # executor (the name holds node, task and attempt). Remove it only if its
            # labels say so; never someone else's.
            other = await self.api.call("GET", f"/containers/{quote(spec.name)}/json")
            labels = ((other or {}).get("Config") or {}).get("Labels") or {}
            if labels.get(LABEL_EXECUTOR) != spec.labels.get(LABEL_EXECUTOR):
                raise
            await self.api.call("DELETE", f"/containers/{quote(spec.name)}",
                            params={"force": "true"}, ok=(200, 204, 404))
            created = await self.api.call("POST", "/containers/create", body=body)
        cid = created["Id"]
        try:
            attach = await asyncio.wait_for(self.api.attach(cid), 30)
            if attach.status != 200:
                text = await attach.text()
                attach.release()
                raise error_of(attach.status, text.encode(), "attach")
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.api.call("DELETE", f"/containers/{cid}", params={"force": "true"})
            raise RuntimeUnavailable("the Podman API did not answer an attach in 30s") from None
        except BaseException:
            with contextlib.suppress(Exception):
                await self.api.call("DELETE", f"/containers/{cid}", params={"force": "true"})
            raise
        return PodmanContainer(self.api, cid, attach, self._max_line, spec.workspace_path,
                               self._max_archive, spec.nice)

    async def _create_volume(self, spec: ContainerSpec) -> None:
        """The workspace volume, created before its container and labelled like it. Podman
        would create it implicitly, without labels: then a volume whose container was gone
        (the executor killed between removing the one and the other, or before creating
        the container) was nobody's, for ever. Labelled, a restarted executor finds it."""
        body = {"Name": spec.workspace_volume, "Label": {**spec.labels, LABEL_MANAGED: "1"}}
        try:
            await self.api.call("POST", "/volumes/create", body=body)
        except PodmanConflict:
            # Left by an earlier life of this node (the name holds node, task and attempt;
            # an older executor made it without labels). A workspace is only ever carried
            # by a checkpoint, never by a leftover volume: replace it, if it is ours.
            other = await self.api.call("GET", f"/volumes/{quote(spec.workspace_volume)}/json")
            owner = ((other or {}).get("Labels") or {}).get(LABEL_EXECUTOR)
            if owner not in (None, spec.labels.get(LABEL_EXECUTOR)):
                raise
            await self.api.call("DELETE", f"/volumes/{quote(spec.workspace_volume)}",
                            params={"force": "true"}, ok=(204, 404))
            await self.api.call("POST", "/volumes/create", body=body)

    async def find_volumes(self, node_id: str) -> list[str]:
        # One label in the filter, and both checked here: Podman 4.3 ORs the label
        # filters of volumes (it ANDs those of containers), so managed=1 plus executor=X
        # listed every node's volumes, and a starting executor removed them all, live
        # agents' included (a forced volume removal removes its container too).
        filters = json.dumps({"label": [f"{LABEL_EXECUTOR}={node_id}"]})
        data = await self.api.call("GET", "/volumes/json", params={"filters": filters})
        return [str(v["Name"]) for v in data or []
                if _ours(v.get("Labels"), node_id) and v.get("Name")]

    async def remove_volume(self, name: str) -> None:
        with contextlib.suppress(PodmanError):
            await self.api.call("DELETE", f"/volumes/{quote(name)}", params={"force": "true"},
                            ok=(204, 404))

    async def host_view(self, cid: str, volume: str) -> HostView | None:
        """The container's init pid (``State.Pid``, in the host's pid namespace) and the
        volume's ``Mountpoint``: two inspects, once per attempt."""
        answers: tuple[Any, Any] = await asyncio.gather(
            self.api.call("GET", f"/containers/{cid}/json"),
            self.api.call("GET", f"/volumes/{quote(volume)}/json"), return_exceptions=True)
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
        data = await self.api.call("GET", "/containers/json", params={"all": "true",
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
        await self.api.call("DELETE", f"/containers/{cid}", params={"force": "true", "t": "0"},
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
