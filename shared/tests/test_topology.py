"""``ensure_topology`` against a real nats-server: creates, updates in place, idempotent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StreamConfig

from vigil import topology
from vigil.natsserver import NatsServer
from vigil.topology import Bucket, ObjectStore, Stream

pytestmark = pytest.mark.integration


@dataclass
class Server:
    nc: NATS
    updates: list[str]  # stream update requests seen on the JetStream API

    @property
    def js(self) -> Any:
        return self.nc.jetstream()

    async def config(self, stream: str) -> StreamConfig:
        return (await self.js.stream_info(stream)).config


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # A server without users, on purpose: this watches every JetStream API request
    # (subscribing to $JS.API.>, which no shipped user may), and runs no service. The
    # services' own permissions for ensure_topology are exercised by every test under
    # tests/, whose servers run the shipped users.
    nats_server = NatsServer(store_dir=tmp_path / "nats")
    await nats_server.start()
    nc = await nats.connect(nats_server.url)
    updates: list[str] = []

    async def seen(msg: Msg) -> None:
        updates.append(msg.subject.rsplit(".", 1)[-1])

    # Every API request is a message: watching them shows what ensure_topology asked for.
    await nc.subscribe("$JS.API.STREAM.UPDATE.>", cb=seen)
    try:
        yield Server(nc, updates)
    finally:
        await nc.close()
        await nats_server.stop()


async def settled(s: Server) -> None:
    await s.nc.flush()  # our subscription has seen every request sent before this


STREAM = Stream(name="T_LOG", subjects=("t.log.>",), retention=RetentionPolicy.LIMITS,
                max_age_s=3600.0, description="v1")
BUCKET = Bucket(name="t-state", history=1, ttl_s=3600.0, max_value_size=4096, description="v1")
STORE = ObjectStore(name="t-blobs", ttl_s=3600.0, description="v1")


async def test_changed_declarations_update_streams_buckets_and_stores(server: Server) -> None:
    await topology.ensure_topology(server.js, streams=[STREAM], buckets=[BUCKET],
                                   object_stores=[STORE])
    kv = await server.js.key_value(BUCKET.name)
    await kv.put("k", b"kept")
    obj = await server.js.object_store(STORE.name)
    await obj.put("o", b"kept too")
    await settled(server)
    assert server.updates == []  # created, nothing to update

    stream2 = replace(STREAM, max_age_s=7200.0, max_msgs=1000, description="v2")
    bucket2 = replace(BUCKET, history=5, ttl_s=7200.0, max_value_size=8192,
                      max_bytes=1 << 20, description="v2")
    store2 = replace(STORE, ttl_s=7200.0, max_bytes=1 << 22, description="v2")
    await topology.ensure_topology(server.js, streams=[stream2], buckets=[bucket2],
                                   object_stores=[store2])
    got = await server.config(STREAM.name)
    assert (got.max_age, got.max_msgs, got.description) == (7200.0, 1000, "v2")
    got = await server.config(bucket2.stream)
    assert (got.max_age, got.max_msgs_per_subject, got.max_msg_size, got.max_bytes,
            got.description) == (7200.0, 5, 8192, 1 << 20, "v2")
    assert got.subjects == [f"$KV.{BUCKET.name}.>"]  # the KV's own settings are kept
    assert got.allow_rollup_hdrs and got.deny_delete
    got = await server.config(store2.stream)
    assert (got.max_age, got.max_bytes, got.description) == (7200.0, 1 << 22, "v2")
    # Updated in place: the data is still there, and the bucket takes more history now.
    assert (await kv.get("k")).value == b"kept"
    assert (await obj.get("o")).data == b"kept too"
    await kv.put("k", b"second")
    assert len(await kv.history("k")) == 2
    await settled(server)
    assert sorted(server.updates) == sorted([STREAM.name, bucket2.stream, store2.stream])

    # The same declarations again: nothing is asked of the server, nothing changes.
    before = [await server.config(n) for n in (STREAM.name, bucket2.stream, store2.stream)]
    server.updates.clear()
    await topology.ensure_topology(server.js, streams=[stream2], buckets=[bucket2],
                                   object_stores=[store2])
    await settled(server)
    assert server.updates == []
    assert [await server.config(n) for n in (STREAM.name, bucket2.stream, store2.stream)] \
        == before


async def test_vigils_own_topology_twice_changes_nothing(server: Server) -> None:
    await topology.ensure_topology(server.js)
    before = {s.name: await server.config(s.name) for s in topology.STREAMS}
    before |= {b.stream: await server.config(b.stream) for b in topology.BUCKETS}
    before |= {o.stream: await server.config(o.stream) for o in topology.OBJECT_STORES}
    await topology.ensure_topology(server.js)
    await settled(server)
    assert server.updates == []
    assert {name: await server.config(name) for name in before} == before


async def test_a_change_the_server_cannot_make_is_a_clear_error(server: Server) -> None:
    await topology.ensure_topology(server.js, streams=[STREAM], buckets=[], object_stores=[])
    with pytest.raises(topology.TopologyError, match="cannot be changed in place"):
        await topology.ensure_stream(
            server.js, replace(STREAM, retention=RetentionPolicy.WORK_QUEUE))
