"""A checkpoint must never poison a task: a drain snapshot of an agent killed mid-write
does not replace the agent's own checkpoint, one it took cleanly does, and a checkpoint
the agent keeps crashing on is rolled back to the one before it.

The soak that found it: 200 tasks, 211 executor kills. A SIGTERM drain snapshotted an
agent between truncating and rewriting its state file; that snapshot superseded the
agent's own good checkpoint, and every later attempt crashed reading the empty file
until the task was ``dead``. Real NATS, real rootless Podman, real executor processes.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from support import ExecutorProcess, Platform, eventually
from vigil import subjects
from vigil.embedded import PodmanService
from vigil.messages import TaskState

GRACE_S = 2

# Checkpoints a good state, then truncates its state file and stays there (as a real
# agent between open(f, "w") and write would) until the drain catches it.
TRUNCATING_AGENT = """
import os, sys, time
import vigil_agent as vigil
path = os.path.join(vigil.workspace(), "state")
if vigil.resumed():
    with open(path) as fh:
        n = int(fh.read())  # an empty file crashes it, as it would a real agent
    print(f"resumed at {n} attempt={vigil.attempt()}", flush=True)
    sys.exit(0)
with open(path, "w") as fh:
    fh.write("41")
print("checkpoint=" + ("ok" if vigil.checkpoint({"n": 41}) else "failed"), flush=True)
fh = open(path, "w")  # truncated; the rewrite comes after the sleep
print("truncated", flush=True)
for _ in range(1200):  # until the executor drains (bounded: 60 s)
    time.sleep(0.05)
fh.write("42")
sys.exit(1)
"""

# Handles SIGTERM: TERM_MODE=exit saves its state and exits 0 (a clean drain);
# TERM_MODE=checkpoint asks for a checkpoint in its grace and then hangs until killed.
TERM_AGENT = """
import os, signal, sys, time
import vigil_agent as vigil
path = os.path.join(vigil.workspace(), "state")
if vigil.resumed():
    with open(path) as fh:
        print(f"resumed with {fh.read()} attempt={vigil.attempt()}", flush=True)
    sys.exit(0)

def on_term(signum, frame):
    with open(path, "w") as fh:
        fh.write("saved on SIGTERM")
    if os.environ["TERM_MODE"] == "exit":
        print("saved; exiting", flush=True)
        sys.exit(0)
    print("grace checkpoint=" + ("ok" if vigil.checkpoint({"n": 2}) else "failed"), flush=True)
    with open(path, "w") as fh:
        fh.write("")  # cut short again: the kill catches it here
    for _ in range(1200):
        time.sleep(0.05)

signal.signal(signal.SIGTERM, on_term)
with open(path, "w") as fh:
    fh.write("checkpointed")
print("checkpoint=" + ("ok" if vigil.checkpoint({"n": 1}) else "failed"), flush=True)
print("waiting", flush=True)
for _ in range(1200):  # until the executor drains (bounded: 60 s)
    time.sleep(0.05)
sys.exit(1)
"""

# Its newest checkpoint makes it crash on start (POISON_ONLY=1: it is its only one).
POISONED_AGENT = """
import os, sys
import vigil_agent as vigil
ws = vigil.workspace()
good, poison = os.path.join(ws, "good"), os.path.join(ws, "poison")
if os.path.exists(poison):
    print(f"poisoned on attempt {vigil.attempt()}", flush=True)
    sys.exit(3)
if os.path.exists(good):
    print(f"resumed good on attempt {vigil.attempt()}", flush=True)
    sys.exit(0)
if vigil.attempt() > 1:
    print(f"fresh start on attempt {vigil.attempt()}", flush=True)
    sys.exit(0)
if os.environ.get("POISON_ONLY") != "1":
    with open(good, "w") as fh:
        fh.write("ok")
    print("good=" + ("ok" if vigil.checkpoint({"n": 1}) else "failed"), flush=True)
with open(poison, "w") as fh:
    fh.write("boom")
print("poison=" + ("ok" if vigil.checkpoint({"n": 2}) else "failed"), flush=True)
sys.exit(1)
"""


def executor(tmp_path: Path, platform: Platform, podman: PodmanService,
             node: str) -> ExecutorProcess:
    return ExecutorProcess(tmp_path, platform.url, node, runtime="podman",
                           podman_url=podman.url, ack_wait_s=6, heartbeat_s=1,
                           stop_grace_s=GRACE_S)


def lines_of(platform: Platform, task_id: str) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") for line in e["lines"]]


async def printed(platform: Platform, task_id: str, line: str) -> bool:
    return line in lines_of(platform, task_id)


def checkpoints(platform: Platform, task_id: str) -> list[tuple[int, str, bool, Any]]:
    return [(c["attempt"], c["reason"], c["clean"], c["note"].get("n"))
            for c in platform.events.of(task_id, "checkpoint") if c["ok"]]


@pytest.mark.fault
@pytest.mark.podman
@pytest.mark.slow
async def test_a_drain_that_kills_an_agent_mid_write_keeps_its_own_checkpoint(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    """The soak's scenario, deterministically. One attempt allowed: without the rule the
    drain snapshot (an empty state file) is restored and the only retry fails."""
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "poison-a").start()
    b = executor(tmp_path, platform, podman, "poison-b")
    try:
        await a.ready()
        await platform.publish_spec({"id": "cut-short", "max_attempts": 1,
                                     "command": ["python3", "-c", TRUNCATING_AGENT]})
        await eventually(lambda: printed(platform, "cut-short", "truncated"), timeout=60,
                         what="the agent to truncate its state file")
        await b.start().ready()
        a.signal(signal.SIGTERM)  # the node is being terminated: drain
        assert await a.exited() == 0
        state = await platform.final_state("cut-short", timeout=90)
        assert state.status == "succeeded", (state.error, state.tail)
        (taken,) = platform.events.of("cut-short", "checkpoint")
        assert (taken["reason"], taken["clean"], taken["note"]) == ("agent", True, {"n": 41})
        assert [(h.executor, h.outcome, h.restored, h.saved) for h in state.history] == [
            ("poison-a", "handed_back", None, taken["name"]),
            ("poison-b", "succeeded", taken["name"], None)]
        assert "resumed at 41 attempt=2" in lines_of(platform, "cut-short")
        # The agent died of the SIGTERM (no handler): the snapshot was not even taken.
        assert '"exit_code":143' in a.log_text() and "checkpoint_skipped" in a.log_text()
        assert state.checkpoint is None and state.checkpoints == []  # succeeded: cleaned up
    finally:
        a.kill()
        b.kill()


@pytest.mark.fault
@pytest.mark.podman
@pytest.mark.slow
async def test_an_agent_that_handles_sigterm_has_its_drain_snapshot_or_grace_checkpoint_used(
    platform: Platform, podman: PodmanService, agent_image: str, tmp_path: Path
) -> None:
    """``tidy`` saves its state on SIGTERM and exits 0 within its grace: the drain
    snapshot is clean and replaces its earlier checkpoint. ``last-word`` asks for a
    checkpoint in its grace, then is killed mid-write: it gets that checkpoint as usual,
    and the unclean drain snapshot does not replace it."""
    await platform.scheduler()
    a = executor(tmp_path, platform, podman, "term-a").start()
    b = executor(tmp_path, platform, podman, "term-b")
    ids = {"tidy": "exit", "last-word": "checkpoint"}
    try:
        await a.ready()
        for task_id, mode in ids.items():
            await platform.publish_spec({"id": task_id, "max_attempts": 1,
                                         "command": ["python3", "-c", TERM_AGENT],
                                         "env": {"TERM_MODE": mode}})
        for task_id in ids:
            await eventually(lambda t=task_id: printed(platform, t, "waiting"), timeout=60,
                             what=f"{task_id} to checkpoint")
        await b.start().ready()
        a.signal(signal.SIGTERM)
        assert await a.exited() == 0
        tidy = await platform.final_state("tidy", timeout=90)
        last = await platform.final_state("last-word", timeout=90)
    finally:
        a.kill()
        b.kill()
    assert tidy.status == "succeeded" and last.status == "succeeded", (tidy.error, last.error)

    assert checkpoints(platform, "tidy") == [(1, "agent", True, 1), (1, "drain", True, None)]
    drained = platform.events.of("tidy", "checkpoint")[1]["name"]
    assert restored(tidy) == [None, drained]
    assert "resumed with saved on SIGTERM attempt=2" in lines_of(platform, "tidy")

    assert checkpoints(platform, "last-word") == [(1, "agent", True, 1), (1, "agent", True, 2)]
    graced = platform.events.of("last-word", "checkpoint")[1]["name"]
    assert restored(last) == [None, graced]
    lines = lines_of(platform, "last-word")
    assert "grace checkpoint=ok" in lines
    assert "resumed with saved on SIGTERM attempt=2" in lines


def restored(state: TaskState) -> list[str | None]:
    return [h.restored for h in state.history]


@pytest.mark.integration
@pytest.mark.podman
async def test_a_checkpoint_the_agent_keeps_crashing_on_is_rolled_back(
    platform: Platform, podman: PodmanService, agent_image: str
) -> None:
    """``relapse`` checkpoints a good state, then a poisoned one, and fails. Attempts 2
    and 3 crash right after restoring the poisoned checkpoint: the task rolls back to the
    good one, confessed, and attempt 4 succeeds, though 3 of its 3 attempts had failed
    (the failures on the poisoned checkpoint are refunded). ``patient-zero`` has only the
    poisoned checkpoint: it rolls back to an empty workspace."""
    await platform.scheduler()
    await platform.executor(runtime="podman", unsafe_runtime=False, podman_url=podman.url,
                            stop_grace_s=1)
    retry = {"backoff_s": 0.1, "jitter": 0}
    for task_id, env in (("relapse", {}), ("patient-zero", {"POISON_ONLY": "1"})):
        await platform.publish_spec({"id": task_id, "max_attempts": 3, "retry": retry,
                                     "command": ["python3", "-c", POISONED_AGENT],
                                     "env": env})
    state = await platform.final_state("relapse", timeout=120)
    zero = await platform.final_state("patient-zero", timeout=120)
    assert state.status == "succeeded", (state.error, state.history)
    assert zero.status == "succeeded", (zero.error, zero.history)

    good, poison = (c["name"] for c in platform.events.of("relapse", "checkpoint"))
    assert [(h.attempt, h.outcome, h.restored, h.saved, h.rolled_back_from)
            for h in state.history] == [
        (1, "failed", None, poison, None),
        (2, "failed", poison, None, None),
        (3, "failed", poison, None, poison),
        (4, "succeeded", good, None, None)]
    lines = lines_of(platform, "relapse")
    assert [ln for ln in lines if "attempt" in ln] == [
        "poisoned on attempt 2", "poisoned on attempt 3", "resumed good on attempt 4"]
    assert [s["resumed"] for s in platform.events.of("relapse", "started")] == [
        False, True, True, True]
    rolled = platform.events.of("relapse", "retrying")[2]
    assert rolled["reason"] == (
        "agent exited with code 3 (1 of 3 attempts spent: the failures on that checkpoint do "
        "not count); retrying in 0.1s; rolled back from checkpoint "
        f"{poison}: the next attempt restores checkpoint {good} (attempt 1, agent)")

    confessions = {c["task_id"]: c for c in await platform.confessions(
        category="checkpoint_rollback")}
    assert set(confessions) == {"relapse", "patient-zero"}
    confession = confessions["relapse"]
    assert confession["severity"] == "warning" and confession["attempt"] == 3
    assert confession["summary"].startswith(
        f"task relapse: attempts 2, 3 failed right after restoring checkpoint {poison} "
        "(attempt 1, agent) without saving a newer one (last: agent exited with code 3; "
        "last output: poisoned on attempt 3); rolled back from checkpoint "
        f"{poison}: the next attempt restores checkpoint {good} (attempt 1, agent)")
    assert poison in confession["hint"]

    (only,) = (c["name"] for c in platform.events.of("patient-zero", "checkpoint"))
    assert [(h.restored, h.rolled_back_from) for h in zero.history] == [
        (None, None), (only, None), (only, only), (None, None)]
    assert "fresh start on attempt 4" in lines_of(platform, "patient-zero")
    assert confessions["patient-zero"]["summary"].endswith(
        "the next attempt restores an empty workspace (no older checkpoint is kept)")

    # Succeeded: nothing is left in the store, the checkpoint rolled back from included.
    store = await platform.js.object_store(subjects.OBJ_CHECKPOINTS)

    async def emptied() -> bool:
        try:
            objects = await store.list(ignore_deletes=True)
        except NotFoundError:  # nats-py's way of saying the store is empty
            return True
        return not [o for o in objects if o.name.startswith(("relapse/", "patient-zero/"))]

    await eventually(emptied, what="the tasks' checkpoints to be deleted")
