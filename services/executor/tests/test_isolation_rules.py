"""Unit tests: the seccomp profile's rules, the user namespaces' room, what a start says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vigil.errors import SettingsError
from vigil_executor.isolation import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    DENIED,
    ENOSYS,
    EPERM,
    NAMESPACE_FLAGS,
    Isolation,
    check_userns_room,
    install_seccomp,
    lower_autogroup,
    lower_priority,
    nice_of,
    priority,
    seccomp_profile,
    subordinate_ids,
)
from vigil_executor.podman import PodmanRuntime
from vigil_executor.runtime import ContainerSpec

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
    "syscalls": [
        {"names": ["read", "clone", "clone3", "unshare", "mount", "setns"],
         "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount", "umount2"], "action": "SCMP_ACT_ALLOW"},  # emptied: dropped
        {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
    ],
}


def actions(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_profile_keeps_the_base_and_drops_the_unconditional_allows() -> None:
    profile = seccomp_profile(BASE)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 38
    assert profile["syscalls"][0] == {"names": ["read"], "action": "SCMP_ACT_ALLOW"}
    assert actions(profile, "bpf") == [BASE["syscalls"][2]]
    assert BASE["syscalls"][0]["names"][1] == "clone"  # the base is not changed
    for name in ("clone", "unshare", "clone3", *DENIED):
        assert not any(r["action"] == "SCMP_ACT_ALLOW" and "args" not in r
                       for r in actions(profile, name)), name


def test_namespace_flags_are_refused_and_other_clones_allowed() -> None:
    profile = seccomp_profile(BASE)
    rules = actions(profile, "unshare")
    assert actions(profile, "clone") == rules
    (allow,) = [r for r in rules if r["action"] == "SCMP_ACT_ALLOW"]
    (arg,) = allow["args"]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["valueTwo"] == 0
    assert all(arg["value"] & flag for flag in NAMESPACE_FLAGS)
    refused = {r["args"][0]["value"] for r in rules if r["action"] == "SCMP_ACT_ERRNO"}
    assert refused == set(NAMESPACE_FLAGS) and {CLONE_NEWUSER, CLONE_NEWNS} <= refused
    assert all(r.get("errnoRet") == EPERM for r in rules if r["action"] == "SCMP_ACT_ERRNO")
    (clone3,) = actions(profile, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == ENOSYS
    (mount,) = actions(profile, "mount")
    assert mount["action"] == "SCMP_ACT_ERRNO" and mount["errnoRet"] == EPERM


def test_install_writes_a_readable_profile_and_refuses_a_missing_base(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    base.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    path = install_seccomp(str(base), tmp_path)
    assert path == tmp_path / "seccomp.json" and path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(SettingsError, match="VIGIL_SECCOMP_BASE"):
        install_seccomp(str(tmp_path / "missing.json"), tmp_path)
    base.write_text("[]")
    with pytest.raises(SettingsError, match="not a seccomp profile"):
        install_seccomp(str(base), tmp_path)


INFO = {"host": {"idMappings": {"uidmap": [
    {"container_id": 0, "host_id": 1001, "size": 1},
    {"container_id": 1, "host_id": 100000, "size": 65536},
]}}}


def test_userns_room_against_the_slots() -> None:
    assert subordinate_ids(INFO) == 65536 and subordinate_ids({}) == 0
    check_userns_room(INFO, 2048, 32)
    check_userns_room({}, 0, 512)  # no namespaces of their own: nothing to check
    with pytest.raises(SettingsError, match=r"room for 32 agents .* fewer than VIGIL_SLOTS=33"):
        check_userns_room(INFO, 2048, 33)


def test_started_resources_say_how_each_is_enforced() -> None:
    full = Isolation(userns_size=2048, seccomp_path="/s.json")
    assert full.resources() == {
        "userns": {"value": "auto:2048", "by": "podman"},
        "seccomp": {"value": "vigil", "by": "seccomp"},
    }
    none = Isolation().resources()
    assert none["userns"]["by"] == "none"
    assert none["seccomp"] == {"value": "podman-default", "by": "seccomp"}


def test_priority_is_nice_only_below_the_executors_own() -> None:
    import os

    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert priority(own + 1) == {"value": own + 1, "by": "nice"}
    assert priority(own) == {"value": own, "by": "none"}
    assert priority(None) == {"value": None, "by": "none"}


def test_lower_priority_lowers_a_process_and_never_raises_it() -> None:
    import os
    import subprocess

    own = os.getpriority(os.PRIO_PROCESS, 0)
    child = subprocess.Popen(["sleep", "30"])  # a process of ours to lower
    try:
        assert lower_priority(child.pid, own + 5) == own + 5 == nice_of(child.pid)
        assert lower_priority(child.pid, own + 2) == own + 5  # already lower: kept
    finally:
        child.kill()
        child.wait()
    assert lower_priority(child.pid, own + 5) is None  # gone


def test_nice_of_this_process_and_of_none() -> None:
    import os

    assert nice_of(os.getpid()) == os.getpriority(os.PRIO_PROCESS, 0)
    assert nice_of(2**22 + 1) is None


def test_create_body_asks_for_its_own_namespace_and_the_profile() -> None:
    rt = PodmanRuntime("unix:///nowhere.sock")
    spec = ContainerSpec(name="c", image="i", command=["true"], env={}, labels={},
                         workspace_volume="v")
    plain = rt.create_body(spec)
    assert "idmappings" not in plain and "seccomp_profile_path" not in plain
    rt.isolation = Isolation(userns_size=4096, seccomp_path="/state/seccomp.json")
    body = rt.create_body(spec)
    assert body["userns"] == {"nsmode": "auto", "value": "size=4096"}
    assert body["idmappings"] == {"AutoUserNs": True, "AutoUserNsOpts": {"Size": 4096}}
    assert body["seccomp_profile_path"] == "/state/seccomp.json"


def test_lower_autogroup_lowers_a_sessions_weight_and_never_raises_it() -> None:
    import subprocess
    from pathlib import Path

    child = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a session of ours
    try:
        group = Path(f"/proc/{child.pid}/autogroup")
        if not group.exists():
            pytest.skip("this kernel has no autogroup")
        assert group.read_text().split()[-1] == "0"
        assert lower_autogroup(f"/proc/{child.pid}", 7) is True
        assert group.read_text().split()[-1] == "7"
        assert lower_autogroup(f"/proc/{child.pid}", 3) is False  # already lower: kept
        assert group.read_text().split()[-1] == "7"
    finally:
        child.kill()
        child.wait()
    assert lower_autogroup(f"/proc/{child.pid}", 7) is False  # gone
