"""Unit tests: the watchdog's rules (when to look again, what counts as crossed, how each
limit is enforced) and its readers on this host's own /proc and a temp directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vigil_executor.runtime import HostView, Limits
from vigil_executor.watchdog import (
    Crossing,
    Target,
    Usage,
    crossed,
    enforcement,
    next_delay,
    node_enforcement,
    processes,
    tree_bytes,
)

pytestmark = pytest.mark.unit


def test_it_looks_sooner_as_a_measure_nears_its_limit() -> None:
    assert next_delay(100, 1024, 100, 0.5, 0.02) == 0.5  # ~9 s away
    assert next_delay(900, 1024, 1000, 0.5, 0.02) == pytest.approx(0.062)
    assert next_delay(1020, 1024, 1000, 0.5, 0.02) == 0.02  # never below the floor
    assert next_delay(None, 1024, 1000, 0.5, 0.02) == 0.5
    assert next_delay(100, None, 1000, 0.5, 0.02) == 0.5


def test_the_first_limit_crossed_is_named_with_its_peak() -> None:
    limits = {"memory_mb": 1024.0, "disk_mb": 512.0, "pids": 32.0}
    assert crossed(Usage(memory_mb=1000, pids=10, disk_mb=10), limits) is None
    hit = crossed(Usage(memory_mb=1180.04, pids=10, processes=4, disk_mb=600), limits)
    assert hit == Crossing(limit="memory_limit", measure="memory_mb", value=1024,
                           peak=1180.0, processes=4)
    assert hit.error == "memory limit 1024 MiB crossed: 1180 MiB in 4 processes"
    assert "resources.memory_mb" in hit.hint and "not retried" in hit.hint
    hit = crossed(Usage(memory_mb=None, disk_mb=513), limits)
    assert hit is not None and hit.limit == "disk_limit"
    assert hit.error == "disk limit 512 MiB crossed: the workspace held 513 MiB"
    hit = crossed(Usage(pids=40, processes=2), limits)
    assert hit is not None and hit.error == "pids limit 32 crossed: 40 processes and " \
        "threads (2 processes)"
    assert crossed(Usage(memory_mb=5000), {"disk_mb": 1.0}) is None  # not watched


def test_how_each_limit_is_enforced() -> None:
    limits = Limits(memory_mb=1024, pids=64, cpus=0, disk_mb=512)
    v1 = enforcement(limits, cgroups=False)
    assert v1 == {"memory_mb": {"value": 1024, "by": "watchdog"},
                  "pids": {"value": 64, "by": "watchdog"},
                  "cpus": {"value": None, "by": "none"},
                  "disk_mb": {"value": 512, "by": "watchdog"}}
    v2 = enforcement(Limits(cpus=1.5), cgroups=True)
    assert [v2[n]["by"] for n in ("memory_mb", "pids", "cpus", "disk_mb")] == [
        "cgroup", "cgroup", "cgroup", "none"]  # no disk_mb set: nothing to enforce
    blind = enforcement(limits, cgroups=False, watchable=False, disk_watchable=False)
    assert blind["memory_mb"]["by"] == "rlimit" and blind["pids"]["by"] == "none"
    assert blind["disk_mb"]["by"] == "none"
    assert node_enforcement(cgroups=False, safe_runtime=True) == {
        "memory_mb": "watchdog", "pids": "watchdog", "cpus": "none", "disk_mb": "watchdog"}
    assert set(node_enforcement(cgroups=True, safe_runtime=False).values()) == {"none"}


def test_processes_reads_pss_and_threads_of_a_procfs() -> None:
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        size, procs, tasks, _ = processes(fd)
    finally:
        os.close(fd)
    assert procs >= 2 and tasks >= procs and size > 1024 * 1024


def test_the_walk_counts_blocks_once_and_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 1024 * 1024)
    os.link(tmp_path / "a" / "f", tmp_path / "hard")  # the same blocks: counted once
    (tmp_path / "out").symlink_to("/usr")  # not followed
    size, entries, unreadable = tree_bytes(str(tmp_path))
    assert 1024 * 1024 <= size < 1024 * 1024 + 64 * 1024
    assert entries == 4 and unreadable == 0
    with pytest.raises(OSError, match=r"Too many levels of symbolic links|Not a directory"):
        tree_bytes(str(tmp_path / "out"))  # a symlinked root is refused too


def test_a_target_says_what_it_cannot_read(tmp_path: Path) -> None:
    assert Target.open(None).problems == ["the runtime does not say where the agent runs"]
    target = Target.open(HostView(pid=None, workspace=str(tmp_path / "missing")))
    assert target.proc_fd is None and target.workspace is None
    assert target.problems == ["the runtime gave no pid for the container",
                               f"cannot read the workspace volume ({tmp_path / 'missing'}: "
                               "No such file or directory)"]
    # An agent that is done before the watchdog looks (a quick one) is nothing to watch
    # and nothing wrong: no problem is said (it used to be confessed as
    # watchdog_unavailable).
    gone = subprocess.Popen(["true"])
    gone.wait()
    for ended in (HostView(pid=gone.pid, workspace=str(tmp_path)),
                  HostView(pid=None, workspace=str(tmp_path), running=False)):
        target = Target.open(ended)
        assert target.proc_fd is None and target.problems == []
    me = Target.open(HostView(pid=os.getpid(), workspace=str(tmp_path)))
    try:
        usage = me.sample(True)
        assert usage.memory_mb is not None and usage.memory_mb > 1
        assert usage.pids is not None and usage.disk_mb is not None
    finally:
        me.close()
    assert me.proc_fd is None and me.sample(True) == Usage()  # closed: nothing read
