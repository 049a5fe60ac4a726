"""``ensure_topology`` on a 3-node cluster: replicas are raised in place, never lowered."""

from __future__ import annotations

import nats
import pytest

from support import as_user, eventually
from vigil import topology
from vigil.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_a_service_without_vigil_replicas_never_shrinks_r3_state(
    nats_cluster: list[NatsServer],
) -> None:
    nc = await nats.connect(servers=[as_user(s.url, "admin") for s in nats_cluster])
    try:
        js = nc.jetstream(timeout=5)

        async def ready() -> bool:  # the cluster elects its JetStream leader after start
            try:
                await topology.ensure_topology(js, replicas=1)
            except Exception:
                return False
            return True

        await eventually(ready, timeout=60, what="the cluster to take streams")
        # Made R1 (a single-node start), then the operator declares R3: raised in place.
        await topology.ensure_topology(js, replicas=3)
        names = ([s.name for s in topology.STREAMS]
                 + [f"KV_{b.name}" for b in topology.BUCKETS]
                 + [f"OBJ_{o.name}" for o in topology.OBJECT_STORES])
        for name in names:
            assert (await js.stream_info(name)).config.num_replicas == 3, name
        # One service started without VIGIL_REPLICAS (its default is 1) must not take
        # the copies away again.
        await topology.ensure_topology(js, replicas=1)
        for name in names:
            assert (await js.stream_info(name)).config.num_replicas == 3, name
    finally:
        await nc.close()
