"""Workspace checkpoints: taken on the agent's request, restored on the next attempt,
and taken on drain, so a task moves to another executor and carries on where it was."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from support import Platform, eventually
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
    a = await platform.executor(node_id="node-a", workspace_root=str(tmp_path / "a"),
                                state_dir=str(tmp_path / "sa"), stop_grace_s=2)
    await platform.publish_spec(process_spec("mover", steps=40, step_s=0.05))
    await platform.events.wait_for("mover", "checkpoint", count=3)
    drained_at = time.monotonic()
    await a.shutdown()  # SIGTERM for an in-process executor: drain
    await eventually(lambda: _state_is(platform, "mover", "scheduled"), what="hand-back")
    await platform.executor(node_id="node-b", workspace_root=str(tmp_path / "b"),
                            state_dir=str(tmp_path / "sb"))
    started = await platform.events.wait_for("mover", "started", count=2)
    moved_in = time.monotonic() - drained_at
    state = await platform.final_state("mover", timeout=60)
    assert state.status == "succeeded" and state.executor == "node-b"
    assert state.attempt == 2
    assert [(h.attempt, h.executor, h.outcome) for h in state.history] == [
        (1, "node-a", "handed_back"), (2, "node-b", "succeeded")]
    assert started[1]["resumed"] is True
    lines = lines_of(platform, "mover")
    resumed_line = next(ln for ln in lines if ln.endswith("attempt=2"))
    resumed_at = int(resumed_line.split()[2])
    assert resumed_at >= 3, resumed_line  # carried on; did not start over
    assert "start at 0 resumed=0 attempt=1" in lines
    assert lines[-1] == "done at 40"
    assert any(c["reason"] == "drain" for c in platform.events.of("mover", "checkpoint"))
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
    a = await platform.executor(node_id="pod-a", **common)
    await platform.publish_spec({"id": "pod-mover", "command": ["python3", "-c", AGENT],
                                 "env": {"STEPS": "25", "STEP_S": "0.1"}})
    await platform.events.wait_for("pod-mover", "checkpoint", count=3, timeout=60)
    await a.shutdown()
    await platform.executor(node_id="pod-b", **common)
    state = await platform.final_state("pod-mover", timeout=90)
    assert state.status == "succeeded" and state.executor == "pod-b"
    lines = lines_of(platform, "pod-mover")
    resumed_line = next(ln for ln in lines if ln.endswith("attempt=2"))
    assert resumed_line.startswith("start at ") and int(resumed_line.split()[2]) >= 3
    assert "resumed=1" in resumed_line
    assert lines[-1] == "done at 25"
