"""Persistent environments, end to end on NATS as shipped: a workspace that outlives tasks,
commits that never overwrite each other (policy ``wait``: tasks take turns; ``fail``: the
loser fails saying so), history and restore, the API's and the CLI's refusals, tenants
walled apart, and the faults: a dead node's hold expires, a failed upload hands back.

Agents append a line to ``$VIGIL_WORKSPACE/lines`` and print what they found. Where two
must overlap, each waits for a ``go`` file in its control directory (mounted read-only
at ``$VIGIL_CONTROL_DIR``), which the test writes: the order is the test's, not a timing
guess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats.errors
import pytest
from nats.js.errors import ObjectNotFoundError

from support import (
    CliResult,
    ExecutorProcess,
    Platform,
    allow_violations,
    as_user,
    eventually,
    run_vigil,
    session_node_id,
    violations,
)
from vigil import auth, subjects
from vigil.client import Client, GatewayError
from vigil.conn import connect
from vigil.embedded import PodmanService
from vigil.environments import EnvironmentSpec, EnvironmentStore, Holder, configured
from vigil.errors import NatsUnavailable
from vigil.messages import TaskState, utcnow
from vigil.natsserver import NatsServer
from vigil_executor.service import Executor
from vigil_gateway.service import Gateway

HELPER = str(Path(__file__).resolve().parent.parent / "images" / "agent")

pytestmark = pytest.mark.integration

AGENT = """
import os, sys, time
path = os.path.join(os.environ["VIGIL_WORKSPACE"], "lines")
before = open(path).read().split() if os.path.exists(path) else []
print("found", ",".join(before) or "-", flush=True)
if os.environ.get("GATE"):
    gate = os.path.join(os.environ["VIGIL_CONTROL_DIR"], "go")
    while not os.path.exists(gate):
        time.sleep(0.02)
if os.environ.get("LINE"):
    with open(path, "a") as fh:
        fh.write(os.environ["LINE"] + "\\n")
    print("wrote", os.environ["LINE"], flush=True)
sys.exit(int(os.environ.get("EXIT", "0")))
"""


@dataclass
class Env:
    """The platform with a token-checking gateway; ``client(tenant, role)`` talks to it."""

    platform: Platform
    gateway: Gateway
    executor: Executor
    tokens: dict[str, str]
    python: str  # the agent's interpreter: python3 in the image, ours on the host

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def client(self, tenant: str = "acme", role: str = "operator") -> Client:
        return Client(self.url, self.tokens[f"{tenant}-{role}"])

    def spec(self, task_id: str, environment: str | None = "e", *, line: str | None = None,
             gate: bool = False, **extra: Any) -> dict[str, Any]:
        env = {"LINE": line or ""} if line else {}
        if gate:
            env["GATE"] = "1"
        spec: dict[str, Any] = {"id": task_id, "command": [self.python, "-c", AGENT],
                                "env": env, **extra}
        if environment is not None:
            spec["environment"] = environment
        return spec

    async def run(self, spec: dict[str, Any], tenant: str = "acme",
                  timeout: float = 60.0) -> TaskState:
        async with self.client(tenant, "submitter") as c:
            await c.submit(spec)
        return await self.platform.final_state(spec["id"], timeout=timeout, tenant=tenant)

    async def submit(self, spec: dict[str, Any], tenant: str = "acme") -> None:
        async with self.client(tenant, "submitter") as c:
            await c.submit(spec)
        self.platform.tenant_of[spec["id"]] = tenant

    def lines(self, task_id: str) -> list[str]:
        return [ln for e in self.platform.events.of(task_id, "log") for ln in e["lines"]]

    async def go(self, task_id: str, attempt: int, tenant: str = "acme") -> None:
        """Let the gated agent of ``attempt`` write and end."""
        d = self.executor.state_dir / "control" / f"{tenant}.{task_id}-a{attempt}"
        (d / "go").write_text("go")
        (d / "go").chmod(0o644)


async def _stack(platform: Platform, tmp_path: Path, python: str,
                 **executor: Any) -> Env:
    tokens_file = tmp_path / "tokens.json"
    tokens = {f"{tenant}-{role}": auth.add_token(tokens_file, f"{tenant}-{role}", tenant, role)
              for tenant in ("acme", "beta") for role in auth.ROLES}
    await platform.scheduler()
    gateway = await platform.gateway(auth="tokens", tokens_file=str(tokens_file))
    ex = await platform.executor(slots=2, **executor)
    return Env(platform, gateway, ex, tokens, python)


@pytest.fixture
async def podman_env(platform: Platform, podman: PodmanService, agent_image: str,
                     tmp_path: Path) -> Env:
    # state_dir at its default under /tmp: the rootless user reads the control dirs.
    return await _stack(platform, tmp_path, "python3", runtime="podman", unsafe_runtime=False,
                       podman_url=podman.url, stop_grace_s=1, node_id=session_node_id())


@pytest.fixture
async def process_env(platform: Platform, tmp_path: Path) -> Env:
    return await _stack(platform, tmp_path, sys.executable,
                       workspace_root=str(tmp_path / "ws"), state_dir=str(tmp_path / "st"))


async def create(env: Env, name: str = "e", tenant: str = "acme", **spec: Any) -> None:
    async with env.client(tenant, "submitter") as c:
        _, created = await c.put_environment(name, spec)
    assert created


# The headline ---------------------------------------------------------------------------------
@pytest.mark.podman
async def test_a_task_finds_what_the_task_before_it_wrote(podman_env: Env,
                                                          agent_image: str) -> None:
    env = podman_env
    await create(env, image=agent_image)
    first = await env.run(env.spec("w1", line="one"))
    assert first.status == "succeeded", first.error
    assert first.environment is not None
    assert (first.environment.base_revision, first.environment.committed_revision) == (0, 1)
    assert "found -" in env.lines("w1")
    second = await env.run(env.spec("w2", line="two"))
    assert second.status == "succeeded", second.error
    assert "found one" in env.lines("w2")
    async with env.client() as c:
        e = await c.environment("e")
        history = await c.environment_history("e")
    assert e.revision == 2 and e.holder is None
    assert [(s.revision, s.task_id) for s in history.history] == [(2, "w2"), (1, "w1")]
    steps = [(ev["step"], ev["revision"]) for ev in env.platform.events.of("w2", "environment")]
    assert steps == [("restored", 1), ("committed", 2)]
    # The image came from the environment: the task named none.
    assert second.spec is not None and second.spec.image == agent_image


async def first_started(env: Env, *task_ids: str) -> str:
    async def probe() -> str | None:
        return next((t for t in task_ids if env.platform.events.of(t, "started")), None)
    return await eventually(probe, timeout=60, what=f"one of {task_ids} to start")


async def workspace_lines(env: Env, environment: str, reader: str) -> list[str]:
    """What the environment's workspace holds now, as a task reading it sees it."""
    state = await env.run(env.spec(reader, environment))
    assert state.status == "succeeded", state.error
    (found,) = [ln for ln in env.lines(reader) if ln.startswith("found ")]
    return [] if found == "found -" else found.removeprefix("found ").split(",")


@pytest.mark.podman
async def test_two_concurrent_tasks_of_a_wait_environment_take_turns(podman_env: Env,
                                                                     agent_image: str) -> None:
    """Both run, one after the other: the second waits (handed back, no attempt spent)
    until the first has committed, then starts from its revision. No write is lost."""
    env = podman_env
    await create(env, image=agent_image, policy="wait")
    await env.submit(env.spec("wa", line="a", gate=True))
    await env.submit(env.spec("wb", line="b", gate=True))
    first = await first_started(env, "wa", "wb")
    second = "wb" if first == "wa" else "wa"
    # The other one found the environment held and went back to wait, spending nothing.
    (waiting, *_) = await env.platform.events.wait_for(second, "retrying", timeout=30)
    assert waiting["reason"].startswith(
        f"waiting for environment e: task {first} (attempt 1, on "), waiting
    assert env.platform.events.of(second, "started") == []
    await env.go(first, 1)
    assert (await env.platform.final_state(first, timeout=60)).status == "succeeded"
    (started,) = await env.platform.events.wait_for(second, "started", timeout=60)
    await env.go(second, started["attempt"])
    final = await env.platform.final_state(second, timeout=60)
    assert final.status == "succeeded", final.error
    assert {h.outcome for h in final.history} == {"handed_back", "succeeded"}
    assert final.environment is not None and final.environment.base_revision == 1
    line = {"wa": "a", "wb": "b"}
    assert f"found {line[first]}" in env.lines(second)
    assert await workspace_lines(env, "e", "wread") == [line[first], line[second]]


@pytest.mark.podman
async def test_two_concurrent_tasks_of_a_fail_environment_one_commits_one_fails_clearly(
    podman_env: Env, agent_image: str
) -> None:
    """Side by side from revision 0: the first to succeed commits; the second's workspace
    is not committed, and it fails saying so: nothing is overwritten, nothing lost
    silently."""
    env = podman_env
    await create(env, "ef", image=agent_image, policy="fail")
    await env.submit(env.spec("fa", "ef", line="a", gate=True))
    await env.submit(env.spec("fb", "ef", line="b", gate=True))
    await env.platform.events.wait_for("fa", "started", timeout=60)
    await env.platform.events.wait_for("fb", "started", timeout=60)
    await env.go("fa", 1)
    won = await env.platform.final_state("fa", timeout=60)
    assert won.status == "succeeded", won.error
    await env.go("fb", 1)
    lost = await env.platform.final_state("fb", timeout=60)
    assert lost.status == "failed" and lost.exit_code == 0
    assert lost.error == ("environment ef moved from revision 0 to 1 while this task ran; its "
                          "workspace was not committed (the environment's policy is fail); "
                          "submit it again to run it on revision 1")
    assert [h.outcome for h in lost.history] == ["failed"]  # not retried
    assert lost.environment is not None and lost.environment.committed_revision is None
    (told,) = [c for c in await env.platform.confessions("environment_conflict")
               if c["task_id"] == "fb"]
    assert told["severity"] == "warning"
    assert await workspace_lines(env, "ef", "fread") == ["a"]
    async with env.client() as c:
        history = await c.environment_history("ef")
    # (The reader left the workspace as it was: no revision of its own.)
    assert [(s.revision, s.task_id) for s in history.history] == [(1, "fa")]
    assert [e["step"] for e in env.platform.events.of("fread", "environment")] == [
        "restored", "unchanged"]


# History and restore ---------------------------------------------------------------------------
async def test_history_keeps_each_revision_and_a_restore_makes_an_old_one_current(
    process_env: Env
) -> None:
    env = process_env
    await create(env)
    for n, line in enumerate(("one", "two", "three"), 1):
        state = await env.run(env.spec(f"h{n}", line=line))
        assert state.status == "succeeded", state.error
    async with env.client("acme", "submitter") as c:
        history = await c.environment_history("e")
        assert history.revision == 3
        assert [(s.revision, s.task_id) for s in history.history] == [
            (3, "h3"), (2, "h2"), (1, "h1")]
        restored = await c.restore_environment("e", 1)
        assert restored.revision == 4 and restored.snapshot is not None
        assert (restored.snapshot.restored_from, restored.snapshot.task_id,
                restored.snapshot.name) == (1, None, history.history[2].name)
        with pytest.raises(GatewayError) as gone:
            await c.restore_environment("e", 9)
    assert (gone.value.status, gone.value.code, gone.value.field) == (
        409, "not_kept", "$.revision")
    assert "keeps no snapshot of revision 9 (kept: 4, 3, 2, 1)" in gone.value.message
    assert await workspace_lines(env, "e", "h-read") == ["one"]
    # The history kept what the restore replaced: revision 3 comes back the same way.
    async with env.client("acme", "submitter") as c:
        assert (await c.restore_environment("e", 3)).revision == 5
    assert await workspace_lines(env, "e", "h-read-2") == ["one", "two", "three"]


# Faults -------------------------------------------------------------------------------------
async def test_a_dead_nodes_hold_expires_and_the_waiting_task_then_runs(
    process_env: Env, nats_server: NatsServer
) -> None:
    """A node died holding the environment: its hold (not renewed) lasts until it expires,
    the task waiting for it is handed back meanwhile, spending nothing, then runs."""
    env = process_env
    await create(env)
    store = await EnvironmentStore.open(env.platform.js)
    got = await store.get("acme", "e")
    assert got is not None
    until = utcnow() + timedelta(seconds=3)
    ghost = Holder(task_id="ghost", attempt=1, executor="dead-node", expires_at=until)
    assert await store.cas(msgspec.structs.replace(got[0], holder=ghost), got[1]) is not None
    state = await env.run(env.spec("after-ghost", line="x"))
    assert state.status == "succeeded", state.error
    waits = env.platform.events.of("after-ghost", "retrying")
    assert waits and all(w["reason"] == "waiting for environment e: task ghost (attempt 1, "
                         "on dead-node) holds it" for w in waits)
    (started,) = env.platform.events.of("after-ghost", "started")
    assert started["time"] >= until.isoformat()
    assert {h.outcome for h in state.history} == {"handed_back", "succeeded"}
    after = await store.get("acme", "e")
    assert after is not None and after[0].holder is None and after[0].revision == 1


async def test_a_snapshot_that_cannot_be_uploaded_hands_the_task_back(
    process_env: Env
) -> None:
    """NATS refuses the commit's upload once: the task is handed back (no attempt spent),
    runs again from the same revision, and commits once."""
    env = process_env
    await create(env)
    real_save = env.executor.snapshots.save
    refused: list[str] = []

    async def unavailable_once(name: str, *args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(name)
            raise NatsUnavailable("upload environment snapshot: NATS did not answer for 60s")
        return await real_save(name, *args, **kwargs)

    env.executor.snapshots.save = unavailable_once  # type: ignore[method-assign]
    state = await env.run(env.spec("upload", line="once"))
    assert refused and state.status == "succeeded", state.error
    assert [(h.attempt, h.outcome) for h in state.history] == [(1, "handed_back"),
                                                               (2, "succeeded")]
    assert state.history[0].error is not None and state.history[0].error.startswith(
        "could not commit the workspace to environment e: upload environment snapshot")
    assert state.environment is not None and state.environment.committed_revision == 1
    (told,) = await env.platform.confessions("environment_commit_failed")
    assert told["task_id"] == "upload"
    assert await workspace_lines(env, "e", "upload-read") == ["once"]


CHECKPOINTING = """
import os, sys
import vigil_agent as vigil
path = os.path.join(vigil.workspace(), "lines")
if vigil.resumed():
    print("resumed with", open(path).read().split(), flush=True)
    with open(path, "a") as fh:
        fh.write("done\\n")
    sys.exit(0)
with open(path, "a") as fh:
    fh.write(os.environ["LINE"] + "\\n")
print("checkpoint", "ok" if vigil.checkpoint() else "failed", flush=True)
gate = os.path.join(os.environ["VIGIL_CONTROL_DIR"], "go")
while os.environ.get("GATE") and not os.path.exists(gate):
    import time; time.sleep(0.02)
sys.exit(3)
"""


def checkpointing(env: Env, task_id: str, environment: str, line: str,
                  gate: bool = False) -> dict[str, Any]:
    return {"id": task_id, "environment": environment,
            "command": [env.python, "-c", CHECKPOINTING], "max_attempts": 2,
            "retry": {"backoff_s": 0.1, "jitter": 0},
            "env": {"PYTHONPATH": HELPER, "LINE": line, **({"GATE": "1"} if gate else {})}}


async def test_a_tasks_own_checkpoint_takes_precedence_over_the_environment(
    process_env: Env
) -> None:
    """Attempt 1 writes, checkpoints and fails; attempt 2 resumes from its checkpoint (not
    from the environment's snapshot, which lacks that write) and commits once."""
    env = process_env
    await create(env)
    assert (await env.run(env.spec("seed", line="seed"))).status == "succeeded"
    state = await env.run(checkpointing(env, "own", "e", "mine"))
    assert state.status == "succeeded", state.error
    assert "resumed with ['seed', 'mine']" in env.lines("own")
    assert state.environment is not None
    assert (state.environment.base_revision, state.environment.committed_revision) == (1, 2)
    assert await workspace_lines(env, "e", "own-read") == ["seed", "mine", "done"]


async def test_a_checkpoint_built_on_an_old_revision_is_never_committed(
    process_env: Env
) -> None:
    """fail policy: while attempt 1 of a task ran (and checkpointed), another task
    committed. Resuming from that checkpoint could only overwrite the other's work: the
    task fails at once, saying so."""
    env = process_env
    await create(env, "ef", policy="fail")
    await env.submit(checkpointing(env, "stale", "ef", "old", gate=True))
    await env.platform.events.wait_for("stale", "checkpoint", timeout=30)
    assert (await env.run(env.spec("newer", "ef", line="new"))).status == "succeeded"
    await env.go("stale", 1)
    state = await env.platform.final_state("stale", timeout=30)
    assert state.status == "failed"
    assert state.error is not None and state.error.startswith(
        "environment ef moved from revision 0 to 1 since this task started from it; its "
        "checkpoint acme/stale/a1-1 builds on revision 0")
    assert len(env.platform.events.of("stale", "started")) == 1  # attempt 2 never ran
    assert await workspace_lines(env, "ef", "stale-read") == ["new"]


# The API's doors ---------------------------------------------------------------------------
async def test_bad_input_is_refused_naming_the_field(process_env: Env) -> None:
    env = process_env
    async with aiohttp.ClientSession(headers={
            "Authorization": f"Bearer {env.tokens['acme-operator']}"}) as http:
        async def put(name: str, body: bytes) -> tuple[int, dict[str, Any]]:
            async with http.put(f"{env.url}/v1/environments/{name}", data=body) as r:
                return r.status, (await r.json())["error"]

        for name, body, status, field, says in (
            ("a%20b", b"{}", 400, "name", "1-64 of [A-Za-z0-9_-]"),
            ("e", b"{not json", 400, "$", "JSON"),
            ("e", b'{"policy": "later"}', 422, "$.policy", "Invalid enum value 'later'"),
            ("e", b'{"image": "no image!"}', 422, "$.image", "matching regex"),
            ("e", b'{"egress": {"allow": ["bad host"]}}', 422, "$.egress.allow[0]",
             "matching regex"),
            ("e", b'{"secrets": {"VIGIL_X": "s"}}', 422, "$.secrets.VIGIL_X", "reserved"),
            ("e", b'{"secrets": {"TOKEN": "nope"}}', 422, "$.secrets.TOKEN",
             "secret 'nope' (for $TOKEN) does not exist in this tenant"),
            ("e", b'{"imgae": "x"}', 422, "$.imgae", "unknown field"),
        ):
            got_status, error = await put(name, body)
            assert (got_status, error.get("field")) == (status, field), (name, body, error)
            assert says in error["message"], error
        await create(env)
        async with http.post(f"{env.url}/v1/environments/e/restore", data=b"{}") as r:
            assert r.status == 422 and (await r.json())["error"]["field"] == "$.revision"
        async with http.post(f"{env.url}/v1/environments/e/restore",
                             data=b'{"revision": 0}') as r:
            assert r.status == 422 and (await r.json())["error"]["field"] == "$.revision"
        async with http.get(f"{env.url}/v1/environments/nope") as r:
            assert r.status == 404
    async with env.client("acme", "submitter") as c:
        with pytest.raises(GatewayError) as refused:
            await c.submit(env.spec("no-env", "nope"))
    assert (refused.value.status, refused.value.field) == (422, "$.environment")
    assert "tenant acme has no environment 'nope'" in refused.value.message
    # A raw NATS submission naming none is recorded failed, naming the field.
    await env.platform.publish_spec(env.spec("raw-no-env", "nope"), tenant="acme")
    state = await env.platform.final_state("raw-no-env", tenant="acme")
    assert state.status == "failed" and state.error is not None
    assert state.error.endswith("(at $.environment)")


async def test_roles_a_viewer_reads_a_submitter_changes_an_operator_deletes(
    process_env: Env
) -> None:
    env = process_env
    async with env.client("acme", "viewer") as viewer:
        with pytest.raises(GatewayError) as no:
            await viewer.put_environment("e", {})
        assert no.value.status == 403
    await create(env)
    assert (await env.run(env.spec("r1", line="x"))).status == "succeeded"
    async with env.client("acme", "viewer") as viewer:
        assert [e.name for e in await viewer.environments()] == ["e"]
        with pytest.raises(GatewayError) as no:
            await viewer.restore_environment("e", 1)
        assert no.value.status == 403
    async with env.client("acme", "submitter") as submitter:
        changed, created = await submitter.put_environment("e", {"policy": "fail"})
        assert not created and changed.policy == "fail" and changed.revision == 1
        with pytest.raises(GatewayError) as no:
            await submitter.delete_environment("e")
        assert no.value.status == 403
    (snap,) = changed.history
    snapshots = await env.platform.js.object_store(subjects.OBJ_ENVIRONMENTS)
    assert (await snapshots.get_info(snap.name)).size == snap.size
    async with env.client("acme", "operator") as operator:
        await operator.delete_environment("e")
        with pytest.raises(GatewayError) as gone:
            await operator.environment("e")
        assert gone.value.status == 404
    with pytest.raises(ObjectNotFoundError):  # the snapshots went with it
        await snapshots.get_info(snap.name)


async def test_a_held_environment_is_neither_restored_nor_deleted_under_its_task(
    process_env: Env
) -> None:
    env = process_env
    await create(env)
    assert (await env.run(env.spec("held-1", line="x"))).status == "succeeded"
    await env.submit(env.spec("held-2", line="y", gate=True))
    await env.platform.events.wait_for("held-2", "started", timeout=30)
    async with env.client("acme", "operator") as c:
        for call in (c.restore_environment("e", 1), c.delete_environment("e")):
            with pytest.raises(GatewayError) as held:
                await call
            assert held.value.status == 409 and held.value.code == "held"
            assert "task held-2 (attempt 1) holds environment e" in held.value.message
    await env.go("held-2", 1)
    assert (await env.platform.final_state("held-2")).status == "succeeded"
    async with env.client("acme", "operator") as c:
        assert (await c.restore_environment("e", 1)).revision == 3


async def test_tenants_are_walled_apart(process_env: Env, nats_server: NatsServer) -> None:
    env = process_env
    await create(env, "shared-name", policy="wait")
    assert (await env.run(env.spec("acme-1", "shared-name", line="acme"))).status == \
        "succeeded"
    async with env.client("beta", "operator") as beta:
        with pytest.raises(GatewayError) as hidden:
            await beta.environment("shared-name")
        assert hidden.value.status == 404  # exactly like a missing one
        assert await beta.environments() == []
        with pytest.raises(GatewayError) as refused:
            await beta.submit(env.spec("beta-1", "shared-name"))
        assert (refused.value.status, refused.value.field) == (422, "$.environment")
        # Its own environment of the same name is another one altogether.
        mine, created = await beta.put_environment("shared-name", {"policy": "fail"})
        assert created and mine.tenant == "beta" and mine.revision == 0
    beta_state = await env.run(env.spec("beta-2", "shared-name", line="beta"), tenant="beta")
    assert beta_state.status == "succeeded"
    assert "found -" in env.lines("beta-2")  # not acme's workspace
    async with env.client("acme", "viewer") as acme:
        theirs = await acme.environment("shared-name")
    assert (theirs.tenant, theirs.policy, theirs.revision) == ("acme", "wait", 1)
    # A platform token reads no tenant's environments.
    tokens_file = Path(env.gateway.settings.tokens_file)
    platform_token = auth.add_token(tokens_file, "oncall", None, "operator", "platform")
    env.gateway.tokens = env.gateway.tokens.merged(auth.TokenBook.load(tokens_file)) \
        if env.gateway.tokens else None
    async with Client(env.url, platform_token) as oncall:
        with pytest.raises(GatewayError) as no:
            await oncall.environments()
        assert no.value.status == 403
    # On raw NATS, a tenant's own user reads no environment at all (another tenant's
    # included): the server refuses it.
    allow_violations(nats_server, "tenant-beta")
    nc = await connect(as_user(nats_server.url, "tenant-beta"), "beta",
                       inbox_prefix=subjects.tenant_inbox("beta"), wait_s=5)
    try:
        stream = f"KV_{subjects.KV_ENVIRONMENTS}"
        with pytest.raises(nats.errors.Error):
            await nc.request(f"$JS.API.DIRECT.GET.{stream}."
                             f"{subjects.environment_kv_subject('acme', 'shared-name')}",
                             b"", timeout=1)
    finally:
        await nc.close()
    assert any("tenant-beta: publish $JS.API.DIRECT.GET.KV_vigil-environments" in v
               for v in violations(nats_server))


async def test_the_cli_creates_changes_shows_restores_and_removes(process_env: Env,
                                                                  tmp_path: Path) -> None:
    env = process_env

    async def vigil(*argv: str, role: str = "operator") -> CliResult:
        return await run_vigil(tmp_path, env.url, env.tokens[f"acme-{role}"], *argv)

    # A secret the tenant does not have is refused as a task naming it is.
    no_secret = await vigil("env", "create", "cli-e", "--secret", "TOKEN=tok",
                            role="submitter")
    assert no_secret.code == 2 and "$.secrets.TOKEN" in no_secret.err, no_secret
    assert "secret 'tok' (for $TOKEN) does not exist in this tenant" in no_secret.err
    made = await vigil("env", "create", "cli-e", "--policy", "fail",
                       "--egress", "api.example.com", role="submitter")
    assert made.code == 0 and made.out.strip() == "created environment cli-e (policy fail)"
    again = await vigil("env", "create", "cli-e", role="submitter")
    assert again.code == 2 and "exists already; change it with `vigil env set cli-e" in again.err
    bad = await vigil("env", "create", "cli-bad", "--egress", "no host!", role="submitter")
    assert bad.code == 2 and "$.egress.allow[0]" in bad.err
    bad_name = await vigil("env", "show", "a b")
    assert bad_name.code == 2 and "is not an environment name" in bad_name.err
    unset = await vigil("env", "set", "cli-e", "--unset-secret", "NOPE", role="submitter")
    assert unset.code == 2 and "the environment sets no secret NOPE" in unset.err
    changed = await vigil("env", "set", "cli-e", "--policy", "wait", role="submitter")
    assert changed.code == 0, changed.err
    shown = (await vigil("env", "show", "cli-e", "--json")).json()
    assert (shown["policy"], shown["secrets"], shown["egress"]) == (
        "wait", {}, {"allow": ["api.example.com"]})
    run = await vigil("submit", "--environment", "cli-e", "--wait", "--", env.python, "-c",
                      "import os; open(os.environ['VIGIL_WORKSPACE'] + '/f', 'w').write('1')",
                      role="submitter")
    assert run.code == 0, run.err
    listed = await vigil("env", "list")
    assert listed.code == 0 and listed.out.splitlines()[1].split()[:3] == ["cli-e", "wait", "1"]
    history = await vigil("env", "history", "cli-e")
    assert history.code == 0 and history.out.splitlines()[1].split()[0] == "1"
    restored = await vigil("env", "restore", "cli-e", "1", role="submitter")
    assert restored.code == 0 and "is at revision 2" in restored.out
    missing = await vigil("env", "restore", "cli-e", "7", role="submitter")
    assert missing.code == 2 and "keeps no snapshot of revision 7" in missing.err, missing
    dry = await vigil("env", "rm", "cli-e")
    assert dry.code == 2 and "run again with --yes" in dry.err
    gone = await vigil("env", "rm", "cli-e", "--yes")
    assert gone.code == 0, gone.err
    assert (await vigil("env", "show", "cli-e")).code == 1


async def test_a_killed_holder_takes_its_hold_back_and_the_waiting_task_goes_next(
    platform: Platform, tmp_path: Path
) -> None:
    """kill -9 the node whose task holds a wait environment: while the task waits for its
    redelivery nobody else gets in (its hold outlives the ack wait); its next attempt, on
    another node, takes its own hold back, commits, and only then does the waiting task
    run, on that revision. No write is lost or doubled."""
    await platform.scheduler()
    store = await EnvironmentStore.open(platform.js)
    await store.create(configured(None, "acme", "ek", EnvironmentSpec(), utcnow()))
    pidfile = tmp_path / "agent.pid"
    a = ExecutorProcess(tmp_path, platform.url, session_node_id(), runtime="process",
                        unsafe_runtime=1, ack_wait_s=3, heartbeat_s=1,
                        workspace_root=tmp_path / "ws-a", state_dir=tmp_path / "st-a")
    first = (f'if [ "$VIGIL_ATTEMPT" = 1 ]; then echo $$ > {pidfile}; exec sleep 60; fi; '
             'echo k1 >> "$VIGIL_WORKSPACE/lines"')
    second = {"id": "k2", "environment": "ek", "command": [sys.executable, "-c", AGENT],
              "env": {"LINE": "k2"}}
    try:
        await a.start().ready()
        await platform.publish_spec({"id": "k1", "environment": "ek",
                                     "command": ["sh", "-c", first]})
        await platform.events.wait_for("k1", "started", timeout=30)
        b = await platform.executor(node_id=session_node_id(), slots=2,
                                    workspace_root=str(tmp_path / "ws-b"),
                                    state_dir=str(tmp_path / "st-b"))
        await platform.publish_spec(second)
        await platform.events.wait_for("k2", "retrying", timeout=30)
        a.signal(signal.SIGKILL)
        await a.exited()
        k1 = await platform.final_state("k1", timeout=60)
        k2 = await platform.final_state("k2", timeout=90)
    finally:
        a.kill()
        with contextlib.suppress(Exception):  # the dead node's agent outlived it
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    assert k1.status == "succeeded", k1.error
    assert [(h.attempt, h.executor, h.outcome) for h in k1.history] == [
        (1, a.node_id, "lost"), (2, b.settings.node_id, "succeeded")]
    assert k1.environment is not None and k1.environment.committed_revision == 1
    assert k2.status == "succeeded", k2.error
    waits = platform.events.of("k2", "retrying")
    assert waits and all(w["reason"].startswith("waiting for environment ek: task k1 ")
                         for w in waits)
    (committed,) = [e for e in platform.events.of("k1", "environment")
                    if e["step"] == "committed"]
    (started,) = platform.events.of("k2", "started")
    assert started["time"] > committed["time"]
    lines = [ln for e in platform.events.of("k2", "log") for ln in e["lines"]]
    assert "found k1" in lines
    got = await store.get("acme", "ek")
    assert got is not None and got[0].revision == 2 and got[0].holder is None
