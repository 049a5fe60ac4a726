"""Executor settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from vigil.imagestore import MAX_MB_DEFAULT
from vigil.messages import ID_PATTERN
from vigil.settings import CommonSettings, default_node_id
from vigil_executor.egress_rules import parse_cidrs


def default_podman_url() -> str:
    return f"unix:///run/user/{os.getuid()}/podman/podman.sock"


def parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}", key):
            raise ValueError(f"VIGIL_LABELS: {item!r} is not key=value")
        out[key] = value
    return out


class ExecutorSettings(CommonSettings, frozen=True, kw_only=True):
    node_id: Annotated[str, Meta(pattern=ID_PATTERN)] = msgspec.field(
        default_factory=default_node_id
    )
    """This node's name, recorded as the task's ``executor``. Default: the hostname."""
    pool: Annotated[str, Meta(pattern=ID_PATTERN)] = "default"
    """The pool whose work this executor takes (``vigil.work.<pool>``)."""
    slots: Annotated[int, Meta(ge=1, le=512)] = 4
    """Agents run at once on this node."""
    labels: str = ""
    """Labels this node advertises, ``key=value`` pairs separated by commas (e.g.
    ``gpu=a100,zone=eu``); tasks with ``node_labels`` run only where all of them match."""
    advertise_s: Annotated[float, Meta(gt=0, le=5)] = 2.0
    """How often the node refreshes its entry in vigil-executors (TTL 15 s)."""
    ack_wait_s: Annotated[float, Meta(ge=2, le=86_400)] = 30.0
    """Lease length: a task whose executor stops renewing is redelivered after this. The
    executor stops the agent itself half a heartbeat earlier, at ``ack_wait - heartbeat
    / 2`` without a confirmed renewal, so it is gone before another node gets the task."""
    heartbeat_s: Annotated[float, Meta(gt=0, le=3_600)] = 5.0
    """Lease renewal interval (in-progress acks); at most a third of the ack wait, so one
    renewal that fails (NATS slow or briefly cut off) does not lose the lease."""
    runtime: Literal["podman", "process", "null"] = "podman"
    """Container runtime. ``process`` and ``null`` are UNSAFE (no sandbox), for benchmarks."""
    unsafe_runtime: bool = False
    """Must be true to use an unsafe runtime."""
    podman_url: str = msgspec.field(default_factory=default_podman_url)
    """The rootless Podman API socket, ``unix:///path/podman.sock``."""
    stop_grace_s: Annotated[float, Meta(ge=0, le=600)] = 10.0
    """SIGTERM-to-SIGKILL grace when stopping an agent."""
    max_line_bytes: Annotated[int, Meta(ge=256, le=65_536)] = 16_384
    """Longer output lines are truncated. It also caps ``::vigil::`` control lines, at
    the smaller of this and 16 KiB: an agent's confession is one such line (summary,
    detail and all), and a longer one is refused with a ``confession_too_large``
    confession (the cut line is kept as log)."""
    pids_limit: Annotated[int, Meta(ge=16)] = 512
    """Processes (and threads) per agent container, for tasks whose ``resources`` set no
    ``pids``. Enforced by cgroups where cgroup v2 is delegated, else by the watchdog."""
    memory_mb: Annotated[int, Meta(ge=128)] = 2048
    """Memory per agent, in MiB, for tasks whose ``resources`` set no ``memory_mb``; over it
    the kernel kills the agent where cgroup v2 is delegated, else the executor's watchdog
    does (the sum of its processes' PSS); either way the task fails with ``memory_limit``.
    Without delegated cgroups each process's data segment is also capped (RLIMIT_DATA, at
    1.5 times this) as a backstop."""
    disk_mb: Annotated[int, Meta(ge=0)] = 10_240
    """Workspace size per agent, in MiB, for tasks whose ``resources`` set no ``disk_mb``
    (0 = none). Enforced by the executor's watchdog, which measures the workspace volume
    and stops the agent past it (ext4/xfs without project quotas cannot size a volume)."""
    watchdog_interval_s: Annotated[float, Meta(ge=0.05, le=1)] = 0.5
    """How often the watchdog measures each agent (memory, processes, workspace) where
    cgroups cannot limit it; more often as a measure nears its limit."""
    cpus: Annotated[float, Meta(ge=0)] = 0.0
    """CPU quota per agent (0 = none). Enforced only where cgroup v2 is delegated."""
    nofile: Annotated[int, Meta(ge=64)] = 1024
    """Open files per agent process (RLIMIT_NOFILE, soft and hard); applies everywhere."""
    nproc: Annotated[int, Meta(ge=64)] = 4096
    """RLIMIT_NPROC per agent: processes (and threads) of its uid. With a user namespace
    per agent (``VIGIL_USERNS_SIZE``, the default) each agent's count is its own; without
    one it counts every process of the rootless Podman user, all agents' together."""
    userns_size: Annotated[int, Meta(ge=0, le=65_536)] = 2048
    """Subordinate ids per agent: each agent runs in a user namespace of its own
    (Podman's ``--userns=auto:size=N``), so its processes have host uids no other agent
    or service has, its RLIMIT_NPROC count is its own, and no agent can signal, trace or
    read another's files. The Podman user's subordinate range must hold ``VIGIL_SLOTS``
    times this (the executor refuses to start otherwise; scripts/setup-host.sh sizes it).
    0 runs every agent as the Podman user's own uid (shared process count: one fork bomb
    stops the next agent from starting); not for production."""
    agent_nice: Annotated[int, Meta(ge=0, le=19)] = 10
    """The nice value agents run at: the executor lowers each agent's first process to it
    after the container is set up and before the agent's own code runs, and everything
    the agent starts inherits it; an agent can never raise it again. Vigil's services,
    the Podman service, conmon and runc stay at their own priority, so starting and
    watching the next task never queues behind a busy agent. Lowering another user's
    process needs root (CAP_SYS_NICE lowers its nice value, but its session's autogroup
    is a file of the agent's, which only root may write): an executor run as the Podman
    user cannot, and its agents then run at the Podman service's own nice value (start
    it niced: ``nice -n 10 podman system service``). 0 leaves agents at the services'
    priority."""
    seccomp_base: str = ""
    """The seccomp profile agents' syscalls start from (JSON, Podman's format), hardened
    by the executor (nested namespaces, mounts and ``clone3`` refused) and written into
    its state directory at start. Default: the profile the Podman service reports as its
    own (``/usr/share/containers/seccomp.json`` on Debian)."""
    output_mb: Annotated[int, Meta(ge=1, le=65_536)] = 100
    """Output (stdout + stderr, and progress events) one attempt may store, MiB, when its
    task sets no ``resources.output_mb``; past it output is dropped with a marker line and
    one ``output_limit`` confession, and the agent keeps running."""
    max_confessions: Annotated[int, Meta(ge=0)] = 100
    """Confession burst per task attempt: the size of its token bucket (full at start).
    Past it, confessions get through at ``VIGIL_CONFESSIONS_PER_MIN``; the rest are
    dropped, counted, and reported once in a platform confession when the agent ends.
    0 turns agents' confessions off: a bucket that holds nothing never refills, whatever
    the rate (each one is still dropped, counted and reported)."""
    confessions_per_min: Annotated[float, Meta(ge=0)] = 10.0
    """Refill rate of the confession bucket (see ``VIGIL_MAX_CONFESSIONS``), per minute,
    up to the burst (so with a burst of 0 it has no effect); 0 makes the burst a hard cap
    per attempt."""
    workspace_root: str = ""
    """Host directory for the unsafe process runtime's workspaces (default: a temp dir)."""
    state_dir: str = ""
    """Host directory for per-attempt control directories, mounted read-only into agents
    (replies to checkpoint requests). Default: /tmp/vigil-executor-<node id>."""
    checkpoint_max_mb: Annotated[float, Meta(gt=0)] = 1024
    """Largest workspace archive a checkpoint may hold, in MiB (fractions allowed, e.g.
    ``0.5``). Counted while the archive downloads, so an oversized workspace does not
    fill the host's disk first: Podman's download stops once it is past the limit plus
    64 KiB of slack (Podman names the archive's members a little differently from the
    stored archive, whose exact size is checked against the limit). The checkpoint fails
    with a clear error to the agent, an event and a confession, and the agent carries on;
    no stored checkpoint exceeds the limit."""
    max_lost_attempts: Annotated[int, Meta(ge=1, le=1_000)] = 5
    """A task whose attempts lost their executor (node died, lease lapsed) this many times
    in total since its last redrive is ``dead`` (a crash loop: it may be killing its
    nodes). Lost attempts do not spend the task's ``max_attempts``; this bounds them."""
    checkpoint_interval_s: Annotated[float, Meta(ge=0)] = 0.0
    """Also checkpoint every this many seconds while an agent runs (0 = only on request
    and on drain). Such snapshots are taken while the agent writes: best effort."""
    tmpfs_mb: Annotated[int, Meta(ge=1, le=65_536)] = 256
    """Size of each private, writable tmpfs in an agent's container, in MiB: ``/tmp``,
    ``/var/tmp``, and ``$HOME`` when a task sets it elsewhere (it defaults to ``/tmp``).
    The root filesystem stays read-only; these hold the agent's scratch files, which are
    not in checkpoints (only the workspace is). tmpfs lives in memory (or swap) and is
    gone when the container is."""
    secrets_key_file: str = ""
    """File of the keys that seal tenants' secrets (``id:base64`` lines of 32-byte keys,
    the first one seals, every one decrypts; ``vigil secret keygen`` prints a line).
    Without it (or VIGIL_SECRETS_KEY), a task naming a secret fails, saying so."""
    secrets_key: str = ""
    """The same text as VIGIL_SECRETS_KEY_FILE, inline, its lines also separable by
    commas (for container platforms that inject secrets as environment); the file's keys
    come first when both are set."""
    secrets_dir: str = ""
    """Host directory (on tmpfs: secrets never touch the disk) for the per-attempt
    directories mounted read-only at ``/run/secrets`` in agents. Default:
    ``/run/user/<Podman's uid>/vigil-secrets-<node id>`` when that is a tmpfs, else
    ``/dev/shm/vigil-secrets-<node id>``; made 0700 for Podman's user."""

    egress_relay: str = "/usr/local/libexec/vigil/vigil-relay"
    """The static ``vigil-relay`` program (built by scripts/setup-host.sh from
    services/executor/relay): inside a container whose task has ``egress`` it listens on
    127.0.0.1:3128 and relays to the task's proxy. Copied at start into the state
    directory, from where containers mount it. Without it, tasks with egress are handed
    back to run on another node (and the executor confesses ``egress_unavailable``)."""
    egress_allow_cidrs: str = ""
    """Networks the egress proxy may connect to although they are not public, comma
    separated (e.g. ``10.20.0.0/16,fd00::/8``). Empty (the default): a task's allowed
    host that resolves to a loopback, private, link-local, multicast or reserved address
    is refused, whatever its rules say."""
    egress_max_events: Annotated[int, Meta(ge=0)] = 1_000
    """``egress`` events per attempt (one per connection); past it connections are only
    counted (``vigil_executor_egress_events_dropped_total``) and the executor says so
    once, in an ``egress_events_capped`` confession."""
    egress_max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 256
    """Connections one attempt may have open through its egress proxy at once; more wait
    for a free one (up to 1,024 in the socket's backlog; past that they are refused)."""
    egress_connect_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0
    """Time for the egress proxy to resolve a host and connect to it (502/504 after)."""

    image_max_mb: Annotated[float, Meta(gt=0)] = MAX_MB_DEFAULT
    """Largest image archive this executor loads from the image store (``vigil image
    push``), in MiB. A task whose image is missing here but pushed is loaded from the
    store on first use; an archive over this limit is refused before any byte is
    downloaded, and the task fails saying so."""
    environment_lease_s: Annotated[float, Meta(ge=5, le=86_400)] = 60.0
    """How long a task's hold on a ``wait`` environment lasts without renewal (renewed
    every heartbeat while it runs): the longest another task of the environment waits
    after this node dies. Keep it above the ack wait, so that the dead node's task, when
    redelivered, takes its own hold back before another task gets in."""

    @property
    def image_max_bytes(self) -> int:
        return max(1, int(self.image_max_mb * 1024 * 1024))

    @property
    def checkpoint_max_bytes(self) -> int:
        return max(1, int(self.checkpoint_max_mb * 1024 * 1024))

    @property
    def label_map(self) -> dict[str, str]:
        return parse_labels(self.labels)

    def __post_init__(self) -> None:
        parse_labels(self.labels)  # a malformed value fails at start, naming the setting
        parse_cidrs(self.egress_allow_cidrs)
        if self.heartbeat_s * 3 > self.ack_wait_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be at most a third of ack_wait_s "
                f"({self.ack_wait_s:g}) so that one lost heartbeat does not lose the lease "
                "(the executor gives the lease up half a heartbeat before the ack wait; "
                "the renewal after a failed one comes two heartbeats after the last)"
            )
