"""Unit tests: the container an agent gets (scratch tmpfs mounts on a read-only root)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vigil.messages import TaskSpec, WorkItem
from vigil_executor.podman import PodmanRuntime
from vigil_executor.sandbox import container_spec, tmpfs_paths
from vigil_executor.settings import ExecutorSettings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("home", "mounts"), [
    ("/tmp", ("/tmp", "/var/tmp")),
    ("/tmp/agent", ("/tmp", "/var/tmp")),
    ("/var/tmp/x/", ("/tmp", "/var/tmp")),
    ("/home/agent", ("/tmp", "/var/tmp", "/home/agent")),
    ("//root/./x/..", ("/tmp", "/var/tmp", "/root")),
    ("/tmpx", ("/tmp", "/var/tmp", "/tmpx")),          # a sibling, not inside /tmp
    ("/workspace", ("/tmp", "/var/tmp")),              # never hide the workspace
    ("/workspace/home", ("/tmp", "/var/tmp")),
    ("/run/vigil", ("/tmp", "/var/tmp")),              # nor the control mount
    ("/proc/self", ("/tmp", "/var/tmp")),
    ("/", ("/tmp", "/var/tmp")),
    ("relative/home", ("/tmp", "/var/tmp")),
    ("", ("/tmp", "/var/tmp")),
])
def test_tmpfs_paths(home: str, mounts: tuple[str, ...]) -> None:
    assert tmpfs_paths(home) == mounts


def work(env: dict[str, str]) -> WorkItem:
    spec = TaskSpec(command=["true"], image="localhost/vigil-agent:latest", env=env)
    return WorkItem(task_id="t1", tenant="acme", spec=spec,
                    submitted_at=datetime(2026, 1, 1, tzinfo=UTC))


def test_the_root_is_read_only_and_scratch_is_private_sized_tmpfs() -> None:
    conf = ExecutorSettings(node_id="n1", tmpfs_mb=64)
    spec = container_spec(work({"HOME": "/home/agent"}), 1, conf, control_dir="/c")
    body = PodmanRuntime("unix:///nowhere.sock").create_body(spec)
    assert body["read_only_filesystem"] is True
    assert spec.env["HOME"] == "/home/agent"
    tmpfs = {m["destination"]: m["options"] for m in body["mounts"] if m["type"] == "tmpfs"}
    assert sorted(tmpfs) == ["/home/agent", "/tmp", "/var/tmp"]
    assert all(opts == ["rw", "nosuid", "nodev", "size=64m", "mode=1777"]
               for opts in tmpfs.values())
    (control,) = [m for m in body["mounts"] if m["type"] == "bind"]
    assert control["source"] == "/c" and "ro" in control["options"]
    default = container_spec(work({}), 1, conf)
    assert default.env["HOME"] == "/tmp" and default.tmpfs == ("/tmp", "/var/tmp")
