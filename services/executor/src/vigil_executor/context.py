"""What an attempt borrows from its executor, named one by one.

An :class:`~vigil_executor.attempt.Attempt` and the modules it is made of (claim, lease,
restore, checkpointing, agentrun, outcome) see the executor only through this frozen
record: the node's settings and metrics, its NATS connection and stores, its container
runtime, and the few calls they need. The executor builds one for each attempt it starts;
its own lifecycle (connect, drain, stop) is none of the attempts' business.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from vigil.environments import EnvironmentStore
from vigil.jetstream import TaskStore
from vigil.messages import Confession
from vigil_executor.checkpoint import CheckpointStore
from vigil_executor.egress import EgressNode
from vigil_executor.images import ImageLoader
from vigil_executor.isolation import Isolation
from vigil_executor.metrics import Metrics
from vigil_executor.runtime import Runtime
from vigil_executor.secrets import Secrets
from vigil_executor.settings import ExecutorSettings


@dataclass(frozen=True, kw_only=True)
class AttemptContext:
    settings: ExecutorSettings
    metrics: Metrics
    nc: NATS  # the lease's flush: only a PING/PONG proves the server got a renewal
    js: JetStreamContext  # events, and the lost attempt's output (its tail)
    store: TaskStore  # the tasks' states: every write a compare-and-set
    runtime: Runtime
    isolation: Isolation | None  # Podman's only
    images: ImageLoader
    egress: EgressNode
    secrets: Secrets
    checkpoints: CheckpointStore
    snapshots: CheckpointStore  # persistent environments' workspace snapshots
    environments: EnvironmentStore
    publish_confession: Callable[[Confession], Awaitable[None]]
    # The attempt's control directory (tenant, task id, attempt): made fresh, and removed.
    control_dir: Callable[[str, str, int], Path]
    remove_control_dir: Callable[[Path], None]
