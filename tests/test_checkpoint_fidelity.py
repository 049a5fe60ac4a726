"""Checkpoints are faithful: a workspace comes back from checkpoint and restore exactly as
it was (hard links, symlinks, long and non-UTF-8 names, empty directories, modes,
mtimes), and an agent's scratch files (/tmp, $HOME: private tmpfs) stay out of it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from support import USED_NODES, Platform, eventually, session_node_id
from vigil import subjects
from vigil.embedded import PodmanService
from vigil_executor.podman import PodmanRuntime
from vigil_executor.podman_container import PodmanContainer
from vigil_executor.runtime import LABEL_EXECUTOR, ContainerSpec
from vigil_executor.sandbox import WORKSPACE

ROOT = Path(__file__).resolve().parent.parent
TREE = (ROOT / "tests" / "agents" / "fidelity.py").read_text()

pytestmark = [pytest.mark.integration, pytest.mark.podman]


def lines_of(platform: Platform, task_id: str, attempt: int) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") if e["attempt"] == attempt
            for line in e["lines"]]


def tree_of(lines: list[str]) -> tuple[list[dict[str, Any]], str]:
    """The ``ROW`` entries and the ``DIGEST`` an agent printed."""
    rows = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
    (digest,) = [line.split()[1] for line in lines if line.startswith("DIGEST ")]
    return rows, digest


def resolved(lines: list[str]) -> dict[str, Any]:
    (line,) = [line for line in lines if line.startswith("RESOLVES ")]
    result: dict[str, Any] = json.loads(line[9:])
    return result


def assert_rich_tree(rows: list[dict[str, Any]]) -> None:
    """The tree holds what it is meant to test (so an empty one cannot pass)."""
    paths = [bytes.fromhex(r["path"]) for r in rows]
    assert any(len(p) > 255 for p in paths) and any(100 < len(p) <= 255 for p in paths)
    assert any(len(p.rsplit(b"/", 1)[-1]) == 255 for p in paths)
    assert b"caf\xe9-latin1.txt" in paths and b"dir-\xff\xfe/\x80\x81" in paths
    groups = [r["link_group"] for r in rows if r.get("link_group")]
    assert len(groups) - len(set(groups)) >= 5  # five hard links in four groups
    assert {r["mode"] for r in rows} >= {"0o751", "0o700", "0o600", "0o755", "0o4755",
                                          "0o2775", "0o1777", "0o444"}
    assert sum(1 for r in rows if "target" in r) == 6


# The runtime alone --------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def runtime(podman: PodmanService) -> AsyncIterator[PodmanRuntime]:
    rt = PodmanRuntime(podman.url, max_archive_bytes=64 * 1024 * 1024)
    await rt.open()
    try:
        yield rt
    finally:
        await rt.close()


class Run:
    """One container of the agent image running the tree agent, its output collected."""

    def __init__(self, rt: PodmanRuntime, node: str, name: str, command: str) -> None:
        self.rt = rt
        self.spec = ContainerSpec(
            name=f"vigil-{node}-{name}", image="localhost/vigil-agent:latest",
            command=["python3", "-c", TREE, command], env={"VIGIL_WORKSPACE": WORKSPACE},
            labels={LABEL_EXECUTOR: node}, workspace_volume=f"vigil-ws-{node}-{name}",
            tmpfs=("/tmp", "/var/tmp"))
        self.lines: list[str] = []
        self.container: PodmanContainer | None = None
        self._pump: asyncio.Task[None] | None = None

    async def create(self) -> PodmanContainer:
        self.container = await self.rt.create(self.spec)
        return self.container

    async def start(self) -> None:
        assert self.container is not None
        await self.container.start()
        self._pump = asyncio.create_task(self._read(self.container))

    async def _read(self, container: PodmanContainer) -> None:
        async for _, line in container.output():
            self.lines.append(line.decode(errors="replace"))

    async def printed_digest(self) -> bool:
        return any(line.startswith("DIGEST ") for line in self.lines)

    async def finish(self) -> int:
        assert self.container is not None and self._pump is not None
        info = await asyncio.wait_for(self.container.wait(), 60)
        await asyncio.wait_for(self._pump, 10)
        return info.exit_code

    async def remove(self) -> None:
        if self.container is not None:
            await self.container.remove()
        await self.rt.remove_volume(self.spec.workspace_volume)


@pytest.mark.parametrize("source", ["running", "stopped"])
async def test_export_then_import_into_another_container_is_exact(
    podman: PodmanService, agent_image: str, source: str
) -> None:
    """Podman archives a running container's workspace as ``workspace/...`` and a stopped
    one's as ``/...`` (agent checkpoints and drain snapshots): both come back identical
    in a fresh container and volume, links resolving there."""
    node = session_node_id()
    USED_NODES.add(node)
    async with runtime(podman) as rt:
        first = Run(rt, node, "src", "build" if source == "stopped" else "build-and-wait")
        second = Run(rt, node, "dst", "digest")
        try:
            container = await first.create()
            await first.start()
            if source == "stopped":
                assert await first.finish() == 0, first.lines
            else:
                await eventually(first.printed_digest, timeout=60, what="the tree built")
            with tempfile.TemporaryFile() as archive:
                async for chunk in container.export_workspace():
                    archive.write(chunk)
                if source == "running":
                    await container.stop(0)
                archive.seek(0)
                with tarfile.open(fileobj=archive, encoding="utf-8",
                                  errors="surrogateescape") as tar:
                    members = tar.getmembers()
                assert members and not [m.name for m in members
                                        if m.name.startswith(("/", "workspace/"))]
                assert all(not m.linkname.startswith(("/", "workspace/"))
                           for m in members if m.islnk())
                archive.seek(0)
                await second.create()
                assert second.container is not None
                await second.container.import_workspace(archive)
            await second.start()
            assert await second.finish() == 0, second.lines[-5:]
        finally:
            await first.remove()
            await second.remove()
    before, digest_before = tree_of(first.lines)
    after, digest_after = tree_of(second.lines)
    assert_rich_tree(before)
    assert after == before
    assert digest_after == digest_before
    links = resolved(second.lines)
    assert links["abs"] == links["rel"] == links["up"] == "hello\n"
    assert links["abs_real"] == "/workspace/plain.txt" and links["dir"] == "inner"


# Through the platform ---------------------------------------------------------------------

def podman_settings(podman: PodmanService, **overrides: object) -> dict[str, object]:
    # state_dir stays at its default under /tmp: the rootless user must reach the control
    # directories it mounts (pytest's tmp_path is private to root).
    return {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
            "stop_grace_s": 1, "node_id": session_node_id(), **overrides}


async def test_a_resumed_attempt_finds_the_workspace_it_checkpointed(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """The agent builds the tree, prints its digest, checkpoints (its container running)
    and fails; the retry is restored from the checkpoint into a new container and volume
    and prints the same digest, its symlinks resolving there."""
    await platform.scheduler()
    await platform.executor(**podman_settings(podman))
    await platform.publish_spec({
        "id": "faithful", "command": ["python3", "-c", TREE, "agent"], "max_attempts": 2,
        "retry": {"backoff_s": 0.1, "jitter": 0}})
    state = await platform.final_state("faithful", timeout=120)
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [(1, "failed"), (2, "succeeded")]
    first, second = lines_of(platform, "faithful", 1), lines_of(platform, "faithful", 2)
    assert "checkpoint=ok" in first
    assert [s["resumed"] for s in platform.events.of("faithful", "started")] == [False, True]
    before, digest_before = tree_of(first)
    after, digest_after = tree_of(second)
    assert_rich_tree(before)
    assert after == before  # row by row first: a failure names the entry
    assert digest_after == digest_before
    links = resolved(second)
    assert links["abs"] == links["rel"] == links["up"] == "hello\n"
    assert links["abs_real"] == "/workspace/plain.txt" and links["dir"] == "inner"
    assert links["dangling"] is False


SCRATCH_AGENT = r"""
import json, os, sys, tempfile
import vigil_agent as vigil
facts = {"home": os.environ["HOME"]}
def tries(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return "ok"
    except OSError as exc:
        return exc.strerror
for name, path in [("tmp", "/tmp/scratch"), ("var_tmp", "/var/tmp/scratch"),
                   ("root", "/scratch"), ("usr", "/usr/scratch"), ("etc", "/etc/scratch")]:
    facts[name] = tries(path)
os.makedirs(os.path.join(os.environ["HOME"], ".cache", "tool"))
facts["home_write"] = tries(os.path.join(os.environ["HOME"], ".cache", "tool", "blob"))
fd, temp = tempfile.mkstemp()
os.write(fd, b"tempfile")
os.close(fd)
facts["tempfile_dir"] = os.path.dirname(temp)
with open(os.path.join(vigil.workspace(), "kept"), "w") as fh:
    fh.write("in the workspace")
facts["checkpoint"] = vigil.checkpoint({})
print("FACTS " + json.dumps(facts), flush=True)
sys.exit(5)  # failed: the state keeps its checkpoint as evidence, for the test to read
"""


@pytest.mark.parametrize("home", [None, "/home/agent"])
async def test_scratch_is_a_private_writable_tmpfs_outside_checkpoints(
    platform: Platform, podman: PodmanService, agent_image: str, home: str | None
) -> None:
    """/tmp, /var/tmp and $HOME (default /tmp, or wherever the task puts it) are writable
    on the read-only root; what is written there is not in the checkpoint, only the
    workspace is (tempfile used to fall back to the workspace when /tmp was read-only)."""
    task_id = f"scratch-{'home' if home else 'default'}"
    await platform.scheduler()
    await platform.executor(**podman_settings(podman, tmpfs_mb=8))
    spec: dict[str, Any] = {"id": task_id, "command": ["python3", "-c", SCRATCH_AGENT],
                            "max_attempts": 1}
    if home:
        spec["env"] = {"HOME": home}
    await platform.publish_spec(spec)
    state = await platform.final_state(task_id, timeout=60)
    assert state.status == "failed" and state.exit_code == 5, state.error
    (line,) = [ln for ln in lines_of(platform, task_id, 1) if ln.startswith("FACTS ")]
    facts = json.loads(line[6:])
    assert facts["home"] == (home or "/tmp")
    assert facts["tmp"] == facts["var_tmp"] == facts["home_write"] == "ok"
    assert facts["root"] == facts["usr"] == facts["etc"] == "Read-only file system"
    assert facts["tempfile_dir"] == "/tmp"
    assert facts["checkpoint"] is True
    assert state.checkpoint is not None
    store = await platform.js.object_store(subjects.OBJ_CHECKPOINTS)
    stored = await store.get(state.checkpoint.name)
    with tarfile.open(fileobj=io.BytesIO(stored.data)) as tar:
        assert tar.getnames() == ["kept"]
