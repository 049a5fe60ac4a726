"""From a work item to a sandboxed container spec: the agent contract's environment."""

from __future__ import annotations

import posixpath

from vigil.messages import Resources, WorkItem
from vigil_executor.egress import EgressMount, proxy_env
from vigil_executor.runtime import (
    CONTROL_PATH,
    LABEL_ATTEMPT,
    LABEL_EXECUTOR,
    LABEL_TASK,
    LABEL_TENANT,
    RELAY_PATH,
    SECRETS_PATH,
    ContainerSpec,
    Limits,
)
from vigil_executor.secrets import NO_SECRETS, AttemptSecrets
from vigil_executor.settings import ExecutorSettings

WORKSPACE = "/workspace"
# Writable scratch on a read-only root. Without them an agent's temp files went where
# Python's tempfile (and most tools) fall back when /tmp is not writable: the current
# directory, the workspace, and from there into every checkpoint.
SCRATCH = ("/tmp", "/var/tmp")  # noqa: S108 - the container's own private tmpfs mounts
# A home here is left as the task set it: a tmpfs would hide what the sandbox provides.
KEEP = ("/proc", "/sys", "/dev", WORKSPACE, CONTROL_PATH, RELAY_PATH, SECRETS_PATH)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def tmpfs_paths(home: str) -> tuple[str, ...]:
    """The private tmpfs mounts of an agent whose ``$HOME`` is ``home``: the scratch
    directories, and the home itself when a task puts it elsewhere. A relative home, or
    one in the workspace, the control mount or a kernel filesystem, gets none: writable
    or not, it is where the task asked for it."""
    if not home.startswith("/"):
        return SCRATCH
    path = "/" + posixpath.normpath(home).lstrip("/")  # normpath keeps a leading "//"
    if path == "/" or any(_within(path, p) for p in (*SCRATCH, *KEEP)):
        return SCRATCH
    return (*SCRATCH, path)


def container_name(node_id: str, tenant: str, task_id: str, attempt: int) -> str:
    # The node is in the name: two executors (or two `vigil up` stacks) sharing one
    # Podman never collide, even on the same task id; so is the tenant (ids are per
    # tenant), after a dot, which neither a tenant nor an id can hold.
    return f"vigil-{node_id}-{tenant}.{task_id}-a{attempt}"


def workspace_volume(node_id: str, tenant: str, task_id: str, attempt: int) -> str:
    """One volume per attempt: the checkpoint, not a node's leftover volume, carries the
    workspace from one attempt to the next (and an orphan never shares a live volume)."""
    return f"vigil-ws-{node_id}-{tenant}.{task_id}-a{attempt}"


def task_limits(work: WorkItem, conf: ExecutorSettings) -> Limits:
    """The task's ``resources`` (the scheduler filled in its tenant's defaults), each
    field it leaves unset this node's setting."""
    res = work.spec.resources or Resources()
    return Limits(
        pids=res.pids or conf.pids_limit,
        memory_mb=res.memory_mb or conf.memory_mb,
        cpus=res.cpus or conf.cpus,
        nofile=conf.nofile,
        nproc=conf.nproc,
        disk_mb=res.disk_mb or conf.disk_mb,
    )


def container_spec(
    work: WorkItem, attempt: int, conf: ExecutorSettings, *, resumed: bool = False,
    control_dir: str | None = None, egress: EgressMount | None = None,
    secrets: AttemptSecrets = NO_SECRETS,
) -> ContainerSpec:
    """The container of one attempt. With ``egress`` (its task has egress rules), the
    relay runs the command and the proxy variables point at it; they win over the task's
    own ``env`` (admission refuses a task that sets them, so only an older scheduler's
    spec could)."""
    spec = work.spec
    assert spec.image is not None, "the scheduler resolves the image"
    env = {
        **spec.env,
        **secrets.env,  # never also in spec.env (TaskSpec refuses that), never VIGIL_*
        "VIGIL_TASK_ID": work.task_id,
        "VIGIL_TENANT": work.tenant,
        "VIGIL_ATTEMPT": str(attempt),
        "VIGIL_RESUMED": "1" if resumed else "0",
        "VIGIL_WORKSPACE": WORKSPACE,
        "VIGIL_CONTROL_DIR": CONTROL_PATH,
        # The root filesystem is read-only; /tmp is a private tmpfs.
        "HOME": spec.env.get("HOME", "/tmp"),  # noqa: S108 - the container's private tmpfs
        **(proxy_env(egress.socket) if egress is not None else {}),
    }
    secrets_dir = str(secrets.directory) if secrets.directory is not None else None
    if secrets_dir is not None:
        env["VIGIL_SECRETS_DIR"] = SECRETS_PATH
    return ContainerSpec(
        name=container_name(conf.node_id, work.tenant, work.task_id, attempt),
        image=spec.image,
        command=egress.command(spec.command) if egress is not None else list(spec.command),
        env=env,
        labels={
            LABEL_TASK: work.task_id,
            LABEL_TENANT: work.tenant,
            LABEL_ATTEMPT: str(attempt),
            LABEL_EXECUTOR: conf.node_id,
        },
        workspace_volume=workspace_volume(conf.node_id, work.tenant, work.task_id, attempt),
        workspace_path=WORKSPACE,
        control_dir=control_dir,
        relay=egress.relay if egress is not None else None,
        secrets_dir=secrets_dir,
        tmpfs=tmpfs_paths(env["HOME"]),
        tmpfs_mb=conf.tmpfs_mb,
        limits=task_limits(work, conf),
        timeout_s=spec.timeout_s or 3600.0,
        stop_grace_s=conf.stop_grace_s,
        nice=conf.agent_nice,
    )
