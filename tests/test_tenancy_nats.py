"""Tenants stay apart at the raw NATS door, enforced by the server (subject permissions),
not by client manners.

Each tenant's own NATS user (``vigil nats-user add --tenant T``; the test server has one
per test tenant, as ``vigil up`` has one for ``default``) may submit and cancel as its
tenant, read its tenant's task states by key and follow its tenant's events. Here tenant
``beta`` tries every read and write of tenant ``acme``'s: each is refused by the server,
``acme``'s task and secrets are untouched and unread, and nothing ``beta`` is told says
whether an ``acme`` task exists.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from support import Platform, allow_violations, as_user, eventually
from vigil import subjects, topology
from vigil.natsserver import NatsServer

pytestmark = pytest.mark.integration

SECRET = "sk-acme-very-secret"
KV = "$JS.API.DIRECT.GET.KV_vigil-tasks.$KV.vigil-tasks"


class Client:
    """A raw NATS client of one tenant: plain nats-py, its user, its inbox prefix."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, url: str) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(as_user(url, f"tenant-{self.tenant}"), error_cb=on_error,
                                     inbox_prefix=subjects.tenant_inbox(self.tenant).encode())
        return self

    async def submit(self, spec: dict[str, Any], tenant: str | None = None,
                     msg_id: str | None = None) -> Any:
        assert self.nc is not None
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        return await self.nc.jetstream().publish(
            subjects.submit(tenant or self.tenant), json.dumps(spec).encode(),
            headers=headers, timeout=2)

    async def state(self, task_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        assert self.nc is not None
        reply = await self.nc.request(f"{KV}.{tenant or self.tenant}.{task_id}", b"",
                                      timeout=2)
        return json.loads(reply.data) if reply.data else None

    async def refused(self, subject: str, count: int = 1) -> None:
        """Wait until the server has told this client it may not use ``subject``."""
        needle = subject.lower()

        async def told() -> bool:
            return sum(needle in e for e in self.errors) >= count

        await eventually(told, timeout=5, what=f"the server to refuse {subject}")


@pytest.fixture
async def tenants(nats_server: NatsServer) -> AsyncIterator[tuple[Client, Client]]:
    allow_violations(nats_server, "tenant-beta")  # what beta tries is the test
    acme = await Client("acme").connect(nats_server.url)
    beta = await Client("beta").connect(nats_server.url)
    try:
        yield acme, beta
    finally:
        for c in (acme, beta):
            if c.nc is not None:
                await c.nc.close()


async def test_a_tenant_reads_and_writes_only_its_own_tasks(
    platform: Platform, tenants: tuple[Client, Client]
) -> None:
    acme, beta = tenants
    await platform.scheduler()
    await platform.executor()
    # acme: submit with a secret, read its own state (secret included: its own).
    ack = await acme.submit({"id": "job-1", "command": ["sh", "-c", "sleep 30"],
                             "env": {"API_KEY": SECRET}})
    assert ack.stream == "VIGIL_SUBMIT"
    own = await eventually(lambda: acme.state("job-1"), what="acme's state")
    assert own["tenant"] == "acme" and own["spec"]["env"]["API_KEY"] == SECRET
    await platform.events.wait_for("job-1", "started")

    # beta reads acme's key: the server refuses the request; no answer, no state.
    assert beta.nc is not None
    with pytest.raises(nats.errors.TimeoutError):
        await beta.state("job-1", tenant="acme")
    await beta.refused(f"{KV}.acme.job-1")
    # ... nor by sequence, nor a watch of the bucket, nor its size, nor the raw stream.
    for subject, body in ((f"$JS.API.STREAM.MSG.GET.KV_{subjects.KV_TASKS}", b'{"seq":1}'),
                          (f"$JS.API.DIRECT.GET.KV_{subjects.KV_TASKS}", b'{"seq":1}'),
                          (f"$JS.API.STREAM.INFO.KV_{subjects.KV_TASKS}", b""),
                          (f"$JS.API.CONSUMER.CREATE.KV_{subjects.KV_TASKS}", b"{}"),
                          (f"$JS.API.STREAM.INFO.{subjects.STREAM_SUBMIT}", b""),
                          (f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_EVENTS}", b"{}"),
                          ("$JS.API.INFO", b""), ("$JS.API.STREAM.NAMES", b"")):
        with pytest.raises(nats.errors.TimeoutError):
            await beta.nc.request(subject, body, timeout=1)
        await beta.refused(subject)
    # beta cannot listen to acme's events, replies or anything else it is not given.
    for subject in (f"{subjects.EVENTS}.acme.>", f"{subjects.EVENTS}.>", "_INBOX.>",
                    f"{subjects.tenant_inbox('acme')}.>", f"{subjects.ISSUES}.>",
                    f"{subjects.WORK}.>", ">"):
        await beta.nc.subscribe(subject)
        await beta.nc.flush()
        await beta.refused(subject)
    # beta cannot submit or cancel as acme.
    submits = (await platform.js.stream_info(subjects.STREAM_SUBMIT)).state.messages
    with pytest.raises(nats.errors.Error):
        await beta.submit({"id": "planted", "command": ["true"]}, tenant="acme")
    await beta.nc.publish(subjects.cancel_request("acme"), b'{"task_id": "job-1"}')
    await beta.nc.flush()
    await beta.refused(subjects.cancel_request("acme"))
    assert (await platform.js.stream_info(subjects.STREAM_SUBMIT)).state.messages == submits
    # Nothing it tried changed acme's task, or leaked its secret to beta.
    assert (await acme.state("job-1"))["status"] == "running"
    assert (await platform.state("job-1", "acme")).cancel_requested_at is None
    assert not any(SECRET in e for e in beta.errors)

    # The same id in beta is beta's own task; acme's stays acme's.
    await beta.submit({"id": "job-1", "command": ["true"]})

    async def beta_done() -> dict[str, Any] | None:
        found = await beta.state("job-1")
        return found if found and found["status"] == "succeeded" else None

    theirs = await eventually(beta_done, what="beta's own job-1 to succeed")
    assert theirs["tenant"] == "beta" and "env" not in theirs["spec"]
    assert (await acme.state("job-1"))["status"] == "running"

    # acme may cancel its own task; its events are its own to follow.
    seen: list[str] = []

    async def on_event(msg: Any) -> None:
        seen.append(msg.subject)

    assert acme.nc is not None
    await acme.nc.subscribe(f"{subjects.EVENTS}.acme.>", cb=on_event)
    await acme.nc.publish(subjects.cancel_request("acme"), b'{"task_id": "job-1"}')

    async def cancelled() -> bool:
        found = await acme.state("job-1")
        return found is not None and found["status"] == "cancelled"

    await eventually(cancelled, timeout=30, what="acme's cancel of its own task")
    async def saw_finished() -> bool:
        return any(s.endswith(".finished") for s in seen)

    await eventually(saw_finished, what="acme to see its finished event")
    assert all(s.startswith(f"{subjects.EVENTS}.acme.") for s in seen)
    assert acme.errors == []  # acme did nothing it may not


async def test_ids_the_platform_makes_are_not_a_tenants_to_choose(
    platform: Platform, tenants: tuple[Client, Client]
) -> None:
    acme, beta = tenants
    await platform.scheduler()
    await platform.executor()
    # A spec id of the shape of a platform id is refused, recorded where the rule puts it.
    ack = await beta.submit({"id": "t_" + "a" * 26, "command": ["true"]})
    refused = await eventually(lambda: beta.state(f"s{ack.seq}"), what="the refusal")
    assert refused["status"] == "failed" and "$.id" in refused["error"]
    assert "platform makes" in refused["error"]
    # A Nats-Msg-Id of such a shape is not taken as the id: the stream sequence is.
    ack = await beta.submit({"command": ["true"]}, msg_id="s1")
    state = await eventually(lambda: beta.state(f"s{ack.seq}"), what="s<seq> task")
    assert state["id"] == f"s{ack.seq}" != "s1"
    # Message ids do not cross tenants: acme's msg id, reused by beta (past the
    # stream's 100 ms duplicate window), is beta's own task, and beta is not told of acme's.
    first = await acme.submit({"command": ["true"]}, msg_id="nightly-7")
    sent_at = time.monotonic()
    await eventually(lambda: acme.state("nightly-7"), what="acme's nightly-7")

    async def window_passed() -> bool:  # the condition is the clock: JetStream's window
        return time.monotonic() - sent_at > topology.TENANT_DUPLICATE_WINDOW_S * 1.5

    await eventually(window_passed, what="the stream's duplicate window to pass")
    second = await beta.submit({"command": ["true"]}, msg_id="nightly-7")
    assert second.duplicate is not True and second.seq != first.seq
    mine = await eventually(lambda: beta.state("nightly-7"), what="beta's nightly-7")
    assert mine["tenant"] == "beta"
    assert (await acme.state("nightly-7"))["tenant"] == "acme"


async def test_two_tenants_tasks_of_one_id_confess_apart(platform: Platform) -> None:
    """Everything keyed by a task names its tenant too: two tenants' tasks ``twin`` that
    fail alike make two confessions (one per tenant, neither deduplicated away by the
    stream or the auditor) and two tenant-owned incident entries."""
    await platform.scheduler()
    await platform.executor()
    await platform.auditor()
    for tenant in ("acme", "beta"):
        await platform.publish_spec({"id": "twin", "command": ["sh", "-c", "exit 5"],
                                     "max_attempts": 1}, tenant=tenant)
    for tenant in ("acme", "beta"):
        state = await platform.final_state("twin", tenant=tenant)
        assert state.status == "failed" and state.tenant == tenant

    async def both() -> list[dict[str, Any]] | None:
        found = await platform.confessions("silent_failure")
        return found if len(found) == 2 else None

    confessed = await eventually(both, what="a silent-failure confession per tenant")
    assert sorted(c["tenant"] for c in confessed) == ["acme", "beta"]
    assert len({c["id"] for c in confessed}) == 2
