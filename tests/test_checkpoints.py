"""Workspace checkpoints: taken on the agent's request, restored on the next attempt,
and taken on drain, so a task moves to another executor and carries on where it was."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest
from nats.js.object_store import OBJ_DEFAULT_CHUNK_SIZE

from support import Platform, eventually, session_node_id
from vigil import subjects
from vigil.embedded import PodmanService

ROOT = Path(__file__).resolve().parent.parent
AGENT = (ROOT / "tests" / "agents" / "counter.py").read_text()
HELPER = str(ROOT / "images" / "agent")

pytestmark = pytest.mark.integration


def lines_of(platform: Platform, task_id: str) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") for line in e["lines"]]


def process_spec(task_id: str, steps: int, step_s: float) -> dict:
    return {"id": task_id, "command": [sys.executable, "-c", AGENT],
            "env": {"STEPS": str(steps), "STEP_S": str(step_s), "PYTHONPATH": HELPER}}


async def test_agent_checkpoints_are_durable_and_acknowledged(platform: Platform,
                                                              tmp_path: Path) -> None:
    await platform.scheduler()
    await platform.executor(workspace_root=str(tmp_path / "ws"),
                            state_dir=str(tmp_path / "state"))
    await platform.publish_spec(process_spec("cp-1", steps=3, step_s=0))
    state = await platform.final_state("cp-1")
    assert state.status == "succeeded"
    lines = lines_of(platform, "cp-1")
    assert lines[0] == "start at 0 resumed=0 attempt=1"
    assert [ln for ln in lines if ln.startswith("step")] == [
        "step 1 checkpoint=ok", "step 2 checkpoint=ok", "step 3 checkpoint=ok"]
    checkpoints = platform.events.of("cp-1", "checkpoint")
    assert len(checkpoints) == 3
    assert all(c["ok"] and c["size"] > 0 and c["digest"].startswith("sha256:")
               for c in checkpoints)
    assert [c["note"] for c in checkpoints] == [{"n": 1}, {"n": 2}, {"n": 3}]
    # A succeeded task no longer needs its checkpoint: the state drops it.
    assert state.checkpoint is None
    assert [h.outcome for h in state.history] == ["succeeded"]


async def test_drain_hands_back_and_another_executor_resumes(platform: Platform,
                                                             tmp_path: Path) -> None:
    await platform.scheduler()
    # Node ids of this session only: one node id runs one executor per host.
    na, nb = session_node_id(), session_node_id()
    a = await platform.executor(node_id=na, workspace_root=str(tmp_path / "a"),
                                state_dir=str(tmp_path / "sa"), stop_grace_s=2)
    await platform.publish_spec(process_spec("mover", steps=40, step_s=0.05))
    await platform.events.wait_for("mover", "checkpoint", count=3)
    drained_at = time.monotonic()
    await a.shutdown()  # SIGTERM for an in-process executor: drain
    await eventually(lambda: _state_is(platform, "mover", "scheduled"), what="hand-back")
    await platform.executor(node_id=nb, workspace_root=str(tmp_path / "b"),
                            state_dir=str(tmp_path / "sb"))
    started = await platform.events.wait_for("mover", "started", count=2)
    moved_in = time.monotonic() - drained_at
    state = await platform.final_state("mover", timeout=60)
    assert state.status == "succeeded" and state.executor == nb
    assert state.attempt == 2
    assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
        (1, na, "handed_back"), (2, nb, "succeeded")]
    assert started[1]["resumed"] is True
    lines = lines_of(platform, "mover")
    resumed_line = next(ln for ln in lines if ln.endswith("attempt=2"))
    resumed_at = int(resumed_line.split()[2])
    assert resumed_at >= 3, resumed_line  # carried on; did not start over
    assert "start at 0 resumed=0 attempt=1" in lines
    assert lines[-1] == "done at 40"
    # The agent has no SIGTERM handler: the drain killed it, so no drain snapshot was
    # kept over its own checkpoints, and attempt 2 resumed from the newest of those.
    taken = platform.events.of("mover", "checkpoint")
    assert {c["reason"] for c in taken} == {"agent"} and all(c["clean"] for c in taken)
    last = max((c for c in taken if c["attempt"] == 1), key=lambda c: c["note"]["n"])
    assert resumed_at == last["note"]["n"], (resumed_line, last)
    assert state.history[1].restored == last["name"]
    assert platform.events.of("mover", "retrying")[0]["reason"] == "executor draining"
    assert moved_in < 5.0


async def _state_is(platform: Platform, task_id: str, status: str) -> bool:
    state = await platform.state(task_id)
    return state is not None and state.status == status


@pytest.mark.podman
async def test_container_workspace_survives_migration(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    await platform.scheduler()
    common = {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
              "stop_grace_s": 1}
    # state_dir stays at its default under /tmp: the rootless user must reach the control
    # directories it mounts (pytest's tmp_path is private to root).
    a = await platform.executor(**common)
    await platform.publish_spec({"id": "pod-mover", "command": ["python3", "-c", AGENT],
                                 "env": {"STEPS": "25", "STEP_S": "0.1"}})
    await platform.events.wait_for("pod-mover", "checkpoint", count=3, timeout=60)
    await a.shutdown()
    b = await platform.executor(**common)
    state = await platform.final_state("pod-mover", timeout=90)
    assert state.status == "succeeded" and state.executor == b.settings.node_id
    lines = lines_of(platform, "pod-mover")
    resumed_line = next(ln for ln in lines if ln.endswith("attempt=2"))
    assert resumed_line.startswith("start at ") and int(resumed_line.split()[2]) >= 3
    assert "resumed=1" in resumed_line
    assert lines[-1] == "done at 25"


def podman_settings(podman: PodmanService, **overrides: object) -> dict[str, object]:
    # state_dir stays at its default under /tmp (see above); node ids are unique to this
    # test session, so a run beside ours never shares a state directory with us.
    return {"runtime": "podman", "unsafe_runtime": False, "podman_url": podman.url,
            "stop_grace_s": 1, "node_id": session_node_id(), **overrides}


BLOB_AGENT = """
import hashlib, os, sys, time
import vigil_agent as vigil
path = os.path.join(vigil.workspace(), "blob")
if vigil.resumed():
    data = open(path, "rb").read()
    print(f"restored {len(data)} {hashlib.sha256(data).hexdigest()}", flush=True)
    sys.exit(0)
size = int(os.environ["BLOB_BYTES"])
data = os.urandom(size)
with open(path, "wb") as fh:
    fh.write(data)
print(f"wrote {size} {hashlib.sha256(data).hexdigest()}", flush=True)
print(f"checkpoint={'ok' if vigil.checkpoint({'bytes': size}) else 'failed'}", flush=True)
for _ in range(1200):  # until the executor drains (bounded: 60 s)
    time.sleep(0.05)
sys.exit(1)
"""


@pytest.mark.podman
async def test_a_multi_chunk_checkpoint_restores_byte_identical_elsewhere(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """A workspace of several object-store chunks (nats-py writes 128 KiB chunks) survives a
    move to another executor bit for bit."""
    size = 10 * OBJ_DEFAULT_CHUNK_SIZE + 12_345  # incompressible, not a chunk multiple
    await platform.scheduler()
    a = await platform.executor(**podman_settings(podman))
    await platform.publish_spec({"id": "blob", "command": ["python3", "-c", BLOB_AGENT],
                                 "env": {"BLOB_BYTES": str(size)}})
    (taken,) = await platform.events.wait_for("blob", "checkpoint", timeout=60)
    assert taken["ok"] and taken["size"] > size
    store = await platform.js.object_store(subjects.OBJ_CHECKPOINTS)
    info = await store.get_info(taken["name"])
    assert info.size == taken["size"] and info.chunks > 10  # really several chunks
    stored = await store.get(taken["name"])
    assert f"sha256:{hashlib.sha256(stored.data).hexdigest()}" == taken["digest"]
    await a.shutdown()  # drain: hand back; another executor restores the checkpoint
    b = await platform.executor(**podman_settings(podman))
    state = await platform.final_state("blob", timeout=90)
    assert state.status == "succeeded", state.error
    assert state.executor == b.settings.node_id and state.attempt == 2
    lines = lines_of(platform, "blob")
    wrote = next(ln for ln in lines if ln.startswith("wrote "))
    restored = next(ln for ln in lines if ln.startswith("restored "))
    assert wrote.split()[1:] == restored.split()[1:]  # same size, same SHA-256
    assert platform.events.of("blob", "started")[1]["resumed"] is True


@pytest.mark.podman
async def test_checkpoint_size_limit_bites_while_downloading(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """VIGIL_CHECKPOINT_MAX_MB (fractions allowed) stops the archive download at the limit:
    the agent is told, an event and a confession say why, and the task goes on."""
    agent = """
import os
import vigil_agent as vigil
big = os.path.join(vigil.workspace(), "big")
with open(big, "wb") as fh:
    fh.write(os.urandom(8 * 1024 * 1024))
print("big", "ok" if vigil.checkpoint({"try": "big"}) else "failed", flush=True)
os.remove(big)
print("small", "ok" if vigil.checkpoint({"try": "small"}) else "failed", flush=True)
"""
    await platform.scheduler()
    await platform.executor(**podman_settings(podman, checkpoint_max_mb=0.25))
    await platform.publish_spec({"id": "hoarder", "command": ["python3", "-c", agent]})
    state = await platform.final_state("hoarder", timeout=60)
    assert state.status == "succeeded", state.error  # the task went on
    assert lines_of(platform, "hoarder") == ["big failed", "small ok"]
    big, small = platform.events.of("hoarder", "checkpoint")
    assert big["ok"] is False and small["ok"] is True and small["size"] < 256 * 1024
    error = big["error"]
    assert error.startswith("workspace archive exceeds the checkpoint limit of 0.25 MiB "
                            "(VIGIL_CHECKPOINT_MAX_MB); stopped reading it after ")
    read = int(error.split("stopped reading it after ")[1].split()[0])
    # Stopped within a chunk or two of the limit, far from the 8 MiB archive.
    assert 256 * 1024 < read < 1024 * 1024
    (confession,) = await platform.confessions(category="checkpoint_failed")
    assert confession["task_id"] == "hoarder" and confession["severity"] == "error"
    assert confession["summary"] == f"checkpoint (agent) failed: {error}"


PERIODIC_AGENT = """
import os, sys, time
stop = os.environ["STOP_FILE"]
n = 0
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    n += 1
    with open("count", "w") as fh:
        fh.write(str(n))
    time.sleep(0.05)
print(f"stopped at {n}", flush=True)
sys.exit(0 if os.path.exists(stop) else 1)
"""


async def test_periodic_checkpoints_happen(platform: Platform, tmp_path: Path) -> None:
    """VIGIL_CHECKPOINT_INTERVAL_S: snapshots while the agent runs, without its asking."""
    stop = tmp_path / "stop"
    await platform.scheduler()
    await platform.executor(workspace_root=str(tmp_path / "ws"),
                            state_dir=str(tmp_path / "state"), checkpoint_interval_s=0.3)
    await platform.publish_spec({"id": "ticker",
                                 "command": [sys.executable, "-c", PERIODIC_AGENT],
                                 "env": {"STOP_FILE": str(stop)}})
    taken = await platform.events.wait_for("ticker", "checkpoint", count=2, timeout=30)
    assert all(c["reason"] == "periodic" and c["ok"] and c["size"] > 0 for c in taken)
    running = await platform.state("ticker")
    assert running is not None and running.checkpoint is not None
    assert running.checkpoint.reason == "periodic"  # the state points at the newest
    stop.touch()
    state = await platform.final_state("ticker", timeout=30)
    assert state.status == "succeeded", state.error


async def test_undecodable_work_is_terminated_and_confessed(platform: Platform) -> None:
    """Garbage on the work subject is terminated (never redelivered) and confessed."""
    ex = await platform.executor()
    ack = await platform.js.publish(subjects.work("default"), b"\x00 this is not a work item")
    (confession,) = await eventually(
        lambda: platform.confessions(category="poison_work_item"), what="poison confession")
    assert confession["summary"].startswith("undecodable work item")
    assert confession["source"] == "executor" and confession["severity"] == "error"
    assert confession["node"] == ex.settings.node_id
    assert confession["id"] == f"executor-poison-{ack.seq}"

    async def settled() -> object:
        info = await platform.js.consumer_info(subjects.STREAM_WORK,
                                               subjects.consumer_executor("default"))
        done = (info.delivered.stream_seq >= ack.seq and info.num_ack_pending == 0
                and info.num_pending == 0)
        return info if done else None

    info = await eventually(settled, what="the work message to be settled")
    assert info.num_redelivered == 0  # terminated, not naked back into the queue
    assert info.delivered.consumer_seq == 1  # delivered once, to one executor


@pytest.mark.podman
async def test_a_corrupt_checkpoint_is_confessed_once_and_the_one_before_it_restored(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """A checkpoint whose bytes are not the archive that was saved (here: not a tar at
    all) can never be restored, on any node: handing the task back would only loop to the
    consumer's max deliveries. The executor says so once, loudly, drops it from the task's
    history and restores the checkpoint before it; with every one corrupt, the agent
    starts from an empty workspace (VIGIL_RESUMED=0)."""
    await platform.scheduler()
    a = await platform.executor(**podman_settings(podman))
    for task_id in ("fragile", "shattered"):
        await platform.publish_spec({"id": task_id, "command": ["python3", "-c", AGENT],
                                     "env": {"STEPS": "12", "STEP_S": "0.3"}})
    for task_id in ("fragile", "shattered"):
        await platform.events.wait_for(task_id, "checkpoint", count=2, timeout=60)
    await a.shutdown()
    held = {}
    for task_id in ("fragile", "shattered"):
        await eventually(lambda t=task_id: _state_is(platform, t, "scheduled"),
                         what=f"hand-back of {task_id}")
        state = await platform.state(task_id)
        assert state is not None and state.checkpoint is not None
        assert len(state.checkpoints) >= 2 and state.checkpoints[0] == state.checkpoint
        held[task_id] = state
    store = await platform.js.object_store(subjects.OBJ_CHECKPOINTS)
    head, before = held["fragile"].checkpoints[:2]
    await store.put(head.name, b"this is not a tar archive\n" * 100)
    for ref in held["shattered"].checkpoints:
        await store.put(ref.name, b"this is not a tar archive\n" * 100)

    b = await platform.executor(**podman_settings(podman))
    corrupt = []
    for task_id in ("fragile", "shattered"):
        state = await platform.final_state(task_id, timeout=90)
        assert state.status == "succeeded", state.error
        assert [(h.executor, h.outcome) for h in state.history] == [
            (a.settings.node_id, "handed_back"), (b.settings.node_id, "succeeded")]
        assert len(platform.events.of(task_id, "retrying")) == 1  # the drain's; no loop
        corrupt += [c for c in await platform.confessions(category="checkpoint_corrupt")
                    if c["task_id"] == task_id]
    # The head only: restored from the one before it, told it resumed.
    assert [s["resumed"] for s in platform.events.of("fragile", "started")] == [False, True]
    before_n = next(c["note"]["n"] for c in platform.events.of("fragile", "checkpoint")
                    if c["name"] == before.name)
    lines = lines_of(platform, "fragile")
    assert f"start at {before_n} resumed=1 attempt=2" in lines, lines
    assert lines[-1] == "done at 12"
    fragile = await platform.state("fragile")
    assert fragile is not None and fragile.history[1].restored == before.name
    # Every one: from scratch, and told so.
    assert [s["resumed"] for s in platform.events.of("shattered", "started")] == [False, False]
    assert "start at 0 resumed=0 attempt=2" in lines_of(platform, "shattered")
    # Once per corrupt checkpoint, naming it.
    names = [head.name, *(r.name for r in held["shattered"].checkpoints)]
    assert sorted(c["id"] for c in corrupt) == sorted(
        f"executor-{n.replace('/', '.')}-corrupt" for n in names)
    assert all(c["severity"] == "critical" and c["attempt"] == 2
               and c["node"] == b.settings.node_id for c in corrupt)
    (first,) = [c for c in corrupt if c["task_id"] == "fragile"]
    assert first["summary"].startswith(
        f"checkpoint {head.name} of task fragile (attempt 1, agent) is corrupt: "
        "its content is not the archive that was saved")
    assert first["summary"].endswith(
        f"the agent resumes from the checkpoint before it, {before.name} (attempt 1, agent), "
        "and loses the progress saved since")
    last = next(c for c in corrupt if c["id"] == names[-1].replace("/", ".").join(
        ("executor-", "-corrupt")))
    assert last["summary"].endswith(
        "the agent starts from an empty workspace, the progress it saved is lost")
    assert not await platform.confessions(category="restore_failed")


LINKED_AGENT = """
import os, sys, time
import vigil_agent as vigil
if vigil.resumed():
    print("resumed", flush=True)
    sys.exit(0)
os.symlink("/etc/hostname", os.path.join(vigil.workspace(), "outside"))
print(f"linked on attempt {vigil.attempt()}", flush=True)
print("checkpoint=" + ("ok" if vigil.checkpoint({}) else "failed"), flush=True)
for _ in range(1200):  # until the executor drains (bounded: 60 s)
    time.sleep(0.05)
sys.exit(1)
"""


async def test_a_checkpoint_that_never_restores_ends_the_task_dead_with_evidence(
    platform: Platform, tmp_path: Path
) -> None:
    """An intact checkpoint that the runtime refuses, delivery after delivery, must neither
    start the agent from an empty workspace nor loop through hand-backs to the consumer's
    max deliveries: each delivery tries three times on fresh containers and hands the task
    back (no attempt spent); the third delivery that fails makes it dead, with the
    checkpoint and the last run's output kept. (The process runtime refuses to unpack a
    link that points outside the workspace: tarfile's data filter.)"""
    await platform.scheduler()
    a = await platform.executor(**dirs(tmp_path, "a"), stop_grace_s=1)
    await platform.publish_spec({"id": "linked", "command": [sys.executable, "-c", LINKED_AGENT],
                                 "env": {"PYTHONPATH": HELPER}})
    await platform.events.wait_for("linked", "checkpoint", timeout=30)
    await a.shutdown()
    await eventually(lambda: _state_is(platform, "linked", "scheduled"), what="hand-back")
    held = await platform.state("linked")
    assert held is not None and held.checkpoint is not None
    assert "linked on attempt 1" in held.tail

    b = await platform.executor(**dirs(tmp_path, "b"))
    node = b.settings.node_id
    state = await platform.final_state("linked", timeout=60)
    assert state.status == "dead", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "handed_back"), (2, "handed_back"), (3, "handed_back"), (4, "failed")]
    prefix = f"could not restore checkpoint {held.checkpoint.name} on {node} (3 tries; "
    assert all((h.error or "").startswith(prefix) for h in state.history[1:])
    # Counted by the typed field, not by the message.
    assert [h.restore_failed for h in state.history] == [None, *[held.checkpoint.name] * 3]
    assert (state.error or "").startswith(prefix)
    assert (state.error or "").endswith("; 3 deliveries could not restore it, so the task "
                                        "is dead instead of started from an empty workspace")
    # The evidence: the checkpoint still referenced, and the last run's output (attempt
    # 1's), not the empty output of the attempts whose agent never ran.
    assert state.checkpoint == held.checkpoint
    assert state.tail == held.tail
    assert len(platform.events.of("linked", "started")) == 1
    retrying = platform.events.of("linked", "retrying")
    assert [(r["attempt"], r["delay_s"]) for r in retrying][1:] == [(2, 5.0), (3, 5.0)]
    restore_failed = await platform.confessions(category="restore_failed")
    assert sorted(c["attempt"] for c in restore_failed) == [2, 3, 4]
    (dead,) = await platform.confessions(category="task_dead")
    assert dead["id"] == "executor-acme.linked-a4-dead" and dead["node"] == node
    assert dead["summary"] == (f"task linked is dead: {state.error}; last checkpoint "
                               f"{held.checkpoint.name}")
    finished = platform.events.of("linked", "finished")
    assert [f["status"] for f in finished] == ["dead"]


def dirs(tmp_path: Path, name: str) -> dict[str, str]:
    return {"workspace_root": str(tmp_path / f"ws-{name}"),
            "state_dir": str(tmp_path / f"state-{name}")}
