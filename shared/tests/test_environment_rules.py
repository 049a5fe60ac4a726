"""The rules of persistent environments, as pure functions (vigil.environments)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from vigil.environments import (
    HISTORY_KEPT,
    Busy,
    Environment,
    EnvironmentSpec,
    Holder,
    Snapshot,
    committed,
    configured,
    conflict,
    released,
    renewed,
    restored,
    snapshot_name,
    take,
    wait_delay,
    with_defaults,
)
from vigil.imagenames import matches
from vigil.imagestore import PushedImage, find
from vigil.messages import Egress, TaskSpec

pytestmark = pytest.mark.unit
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def env(policy: str = "wait", **kw: object) -> Environment:
    base = configured(None, "acme", "e", EnvironmentSpec(policy=policy), NOW)  # type: ignore[arg-type]
    return msgspec.structs.replace(base, **kw)


def snap(revision: int, task: str = "t", name: str | None = None) -> Snapshot:
    return Snapshot(revision=revision, name=name or f"acme/e/r{revision}-{task}-a1", size=10,
                    digest="sha256:x", committed_at=NOW, task_id=task, attempt=1)


def test_a_wait_environment_is_held_by_one_task_at_a_time() -> None:
    e = env()
    held = take(e, "t1", 1, "n1", NOW, 60)
    assert isinstance(held, Environment) and held.holder is not None
    assert held.holder.expires_at == NOW + timedelta(seconds=60)
    busy = take(held, "t2", 1, "n2", NOW, 60)
    assert isinstance(busy, Busy) and busy.holder.task_id == "t1"
    assert busy.reason("e") == "waiting for environment e: task t1 (attempt 1, on n1) holds it"
    # The same task's next attempt (a drain, a lost node, a retry) takes it over.
    again = take(held, "t1", 2, "n3", NOW, 60)
    assert isinstance(again, Environment) and again.holder is not None
    assert (again.holder.attempt, again.holder.executor) == (2, "n3")
    # A hold not renewed expires: a dead node's task does not hold it forever.
    later = NOW + timedelta(seconds=61)
    freed = take(held, "t2", 1, "n2", later, 60)
    assert isinstance(freed, Environment) and freed.holder is not None
    assert freed.holder.task_id == "t2"


def test_a_fail_environment_is_never_held() -> None:
    e = env("fail")
    assert take(e, "t1", 1, "n", NOW, 60) is e


def test_renewal_and_release_only_by_the_holder() -> None:
    held = take(env(), "t1", 1, "n1", NOW, 60)
    assert isinstance(held, Environment)
    later = NOW + timedelta(seconds=30)
    renewal = renewed(held, "t1", 1, later, 60)
    assert renewal is not None and renewal.holder is not None
    assert renewal.holder.expires_at == later + timedelta(seconds=60)
    assert renewed(held, "t1", 2, later, 60) is None  # a newer attempt holds it now
    assert renewed(held, "t2", 1, later, 60) is None
    assert released(held, "t2") is None
    free = released(held, "t1")
    assert free is not None and free.holder is None


def test_a_commit_needs_the_revision_it_started_from_and_the_hold() -> None:
    e = env(revision=3)
    assert conflict(e, 3, "t1", 1) is None
    assert conflict(e, 2, "t1", 1) == ("environment e moved from revision 2 to 3 while "
                                       "this task ran")
    other = msgspec.structs.replace(e, holder=Holder(task_id="t2", attempt=1, executor="n",
                                                     expires_at=NOW))
    why = conflict(other, 3, "t1", 1)
    assert why is not None and "held by task t2" in why
    # A fail environment judges the revision only.
    assert conflict(msgspec.structs.replace(other, policy="fail"), 3, "t1", 1) is None


def test_commits_count_revisions_keep_a_history_and_release_the_hold() -> None:
    e = take(env(), "t0", 1, "n", NOW, 60)
    assert isinstance(e, Environment)
    dropped_all: list[str] = []
    for n in range(1, HISTORY_KEPT + 3):
        e, dropped = committed(e, snap(n, task=f"t{n - 1}"), NOW)
        dropped_all += dropped
    assert e.revision == HISTORY_KEPT + 2 and e.snapshot == e.history[0]
    assert [s.revision for s in e.history] == list(range(HISTORY_KEPT + 2, 2, -1))
    assert dropped_all == ["acme/e/r1-t0-a1", "acme/e/r2-t1-a1"]
    assert e.holder is None  # t0's commit released its hold


def test_a_restore_is_a_new_revision_sharing_the_old_object() -> None:
    e = env()
    for n in (1, 2, 3):
        e, _ = committed(e, snap(n), NOW)
    r, dropped = restored(e, 1, NOW)
    assert r.revision == 4 and r.snapshot is not None
    assert (r.snapshot.name, r.snapshot.restored_from, r.snapshot.task_id) == (
        "acme/e/r1-t-a1", 1, None)
    assert [s.revision for s in r.history] == [4, 3, 2, 1] and dropped == []
    with pytest.raises(ValueError, match=r"keeps no snapshot of revision 9 \(kept: 3, 2, 1\)"):
        restored(e, 9, NOW)
    # The object two revisions share is deleted only when neither is kept.
    for n in range(5, 5 + HISTORY_KEPT - 1):
        r, dropped = committed(r, snap(n), NOW)
        assert "acme/e/r1-t-a1" not in dropped
    r, dropped = committed(r, snap(99), NOW)
    assert "acme/e/r1-t-a1" in dropped


def test_snapshot_names_differ_per_committing_attempt() -> None:
    assert snapshot_name("acme", "e", 4, "t1", 2) == "acme/e/r4-t1-a2"
    assert snapshot_name("acme", "e", 4, "t1", 2) != snapshot_name("acme", "e", 4, "t2", 1)


def test_waiting_backs_off_to_a_bound() -> None:
    assert [wait_delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 50)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_environment_defaults_fill_what_the_task_leaves_open() -> None:
    e = env(image="localhost/e:1", egress=Egress(allow=["example.com"]),
            secrets={"TOKEN": "tok", "KEY": "k", "SHARED": "env-one"})
    spec = TaskSpec(command=["true"], environment="e", env={"KEY": "mine"},
                    secrets={"SHARED": "task-one"})
    merged = with_defaults(spec, e)
    assert merged.image == "localhost/e:1"
    assert merged.egress == Egress(allow=["example.com"])
    # The task's own secrets win; a name it sets in env is its own (no secret under it).
    assert merged.secrets == {"TOKEN": "tok", "SHARED": "task-one"}
    own = TaskSpec(command=["true"], image="mine:2", egress=Egress(allow=[]))
    assert with_defaults(own, e).image == "mine:2"
    assert with_defaults(own, e).egress == Egress(allow=[])


def test_environment_spec_refuses_reserved_secret_names() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.secrets\.VIGIL_X"):
        msgspec.json.decode(b'{"secrets": {"VIGIL_X": "s"}}', type=EnvironmentSpec)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.policy"):
        msgspec.json.decode(b'{"policy": "later"}', type=EnvironmentSpec)


def test_pushed_images_are_found_by_the_names_podman_would_resolve() -> None:
    pushed = [PushedImage(name=n, image_id="i", size=1, digest="sha256:d")
              for n in ("localhost/agent:v2", "docker.io/library/python:3")]
    assert find(pushed, "localhost/agent:v2") is pushed[0]
    assert find(pushed, "agent:v2") is pushed[0]
    assert find(pushed, "agent") is None  # :latest is another tag
    assert find(pushed, "python:3") is pushed[1]
    assert not matches("localhost/agent:v2", "sha256:" + "a" * 64)
