"""The headline promise, on NATS as shipped (least-privilege users; see tests/support.py):
an agent that checkpoints and then fails resumes from its checkpoint on the next attempt,
and a restore that fails for the platform's own reasons is charged to nobody.

(Before 0.2 the restore's object-store read asked the server for `$JS.API.STREAM.NAMES`,
which the executor's user may not: every resume timed out, was recorded as a lost node,
and the task ended dead as a "crash loop". The suite's servers had no users then.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from support import Platform, session_node_id
from vigil.transitions import spent_attempts

pytestmark = pytest.mark.integration

HELPER = str(Path(__file__).resolve().parent.parent / "images" / "agent")
# Attempt 1 writes its state, checkpoints, and fails; a resumed attempt checks the state
# is there and succeeds.
AGENT = """
import os, sys
import vigil_agent as vigil
path = os.path.join(vigil.workspace(), "state")
if vigil.resumed():
    print("resumed with", open(path).read(), flush=True)
    sys.exit(0)
with open(path, "w") as fh:
    fh.write("progress-41")
print("checkpoint", "ok" if vigil.checkpoint({"n": 41}) else "failed", flush=True)
sys.exit(3)
"""


def spec(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "command": [sys.executable, "-c", AGENT], "max_attempts": 3,
            "retry": {"backoff_s": 0.1, "jitter": 0},
            "env": {"PYTHONPATH": HELPER}}


def lines_of(platform: Platform, task_id: str) -> list[str]:
    return [line for e in platform.events.of(task_id, "log") for line in e["lines"]]


async def test_a_failed_attempt_resumes_from_its_checkpoint(platform: Platform,
                                                            tmp_path: Path) -> None:
    await platform.scheduler()
    await platform.executor(workspace_root=str(tmp_path / "ws"),
                            state_dir=str(tmp_path / "st"), node_id=session_node_id())
    await platform.publish_spec(spec("resume-1"))
    state = await platform.final_state("resume-1")
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [(1, "failed"),
                                                               (2, "succeeded")]
    assert "checkpoint ok" in lines_of(platform, "resume-1")
    assert "resumed with progress-41" in lines_of(platform, "resume-1")
    started = platform.events.of("resume-1", "started")
    assert [s["resumed"] for s in started] == [False, True]


async def test_a_restore_the_platform_cannot_do_costs_the_agent_nothing(
    platform: Platform, tmp_path: Path
) -> None:
    """The object store does not answer (as when a permission is missing, or NATS is
    away) at the restore: the attempt is handed back, confessed as the platform's, and
    spends nothing of the task's budget; the next try restores and resumes."""
    await platform.scheduler()
    ex = await platform.executor(workspace_root=str(tmp_path / "ws"),
                                 state_dir=str(tmp_path / "st"), node_id=session_node_id())
    real_load = ex.checkpoints.load
    refused: list[str] = []

    async def unavailable_once(name: str, into: Any) -> int:
        if not refused:
            refused.append(name)
            raise nats.errors.TimeoutError  # what a refused request looks like to a client
        return await real_load(name, into)

    ex.checkpoints.load = unavailable_once  # type: ignore[method-assign]
    await platform.publish_spec(spec("resume-2"))
    state = await platform.final_state("resume-2")
    assert refused, "the restore was never tried"
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "failed"), (2, "handed_back"), (3, "succeeded")]
    handed_back = state.history[1]
    assert handed_back.error is not None and "could not download checkpoint" in handed_back.error
    # Charged to nobody: only the agent's own failure counts against its budget, no
    # attempt is recorded as a lost node.
    assert spent_attempts(state) == 1
    assert not any(h.outcome == "lost" for h in state.history)
    confessed = await platform.confessions("restore_unavailable")
    assert [c["task_id"] for c in confessed] == ["resume-2"]
    assert "resumed with progress-41" in lines_of(platform, "resume-2")


async def test_nats_failing_in_the_restores_bookkeeping_hands_the_task_back(
    platform: Platform, tmp_path: Path
) -> None:
    """The newest checkpoint cannot be restored (gone from the store), and the write
    that drops it from the task's history meets NATS away (the store's retries give up:
    NatsUnavailable). That is the platform's trouble, a retryable one: the attempt is
    handed back, spending nothing, and the next try restores. (It used to end the task
    ``failed`` for good, with no retry: a refusal of ours, as if the task were wrong.)"""
    from vigil.errors import NatsUnavailable
    from vigil_executor.checkpoint import CheckpointError

    await platform.scheduler()
    ex = await platform.executor(workspace_root=str(tmp_path / "ws"),
                                 state_dir=str(tmp_path / "st"), node_id=session_node_id())
    real_load, real_cas = ex.checkpoints.load, ex.store.cas
    faults: list[str] = []

    async def gone_once(name: str, into: Any) -> int:
        if not faults:
            faults.append("gone")
            raise CheckpointError(f"checkpoint {name} is not in the object store")
        return await real_load(name, into)

    async def nats_away_once(state: Any, revision: int) -> int | None:
        if faults == ["gone"]:  # the write right after: dropping it from the history
            faults.append("nats away")
            raise NatsUnavailable("write task: NATS did not answer for 30s (TimeoutError)")
        return await real_cas(state, revision)

    ex.checkpoints.load = gone_once  # type: ignore[method-assign]
    ex.store.cas = nats_away_once  # type: ignore[method-assign]
    await platform.publish_spec(spec("resume-3"))
    state = await platform.final_state("resume-3")
    assert faults == ["gone", "nats away"]
    assert state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [
        (1, "failed"), (2, "handed_back"), (3, "succeeded")]
    assert spent_attempts(state) == 1
    assert "resumed with progress-41" in lines_of(platform, "resume-3")
    confessed = await platform.confessions("platform_unavailable")
    assert [c["task_id"] for c in confessed] == ["resume-3"]
