"""How agents are kept apart from each other and from the host, beyond Podman's defaults.

- A user namespace per agent (Podman's ``--userns=auto``): each container gets its own
  slice of the Podman user's subordinate ids, so its processes have host uids of their
  own. RLIMIT_NPROC counts processes per uid, so an agent that forks to its limit no
  longer starves the next container's init (or Podman itself) of processes, and no agent
  can signal, ptrace or read another's files (or the Podman user's).
- A seccomp profile: Podman's default allows ``unshare(CLONE_NEWUSER)`` and ``mount`` to
  anyone (measured: ``unshare -U true`` succeeds in an agent). A nested user namespace
  gives an agent every capability inside it, and with them the mount, network and
  kernel-module-adjacent surface the sandbox otherwise denies, so new namespaces and every
  mount call are refused (EPERM). ``clone3`` passes its flags in memory, where seccomp
  cannot look, so it is refused with ENOSYS: libc then falls back to ``clone``, whose
  flags can be filtered.
- A lower scheduling priority: each agent's first process is lowered to
  ``VIGIL_AGENT_NICE`` between Podman's ``init`` and ``start`` (see
  ``PodmanContainer.start``), so all the agent runs inherits it and it can never raise
  it again, while the Podman service, conmon and runc keep the services' priority (the
  next task's container start does not queue behind busy agents: measured by
  bench/burners.py). Lowering another user's process needs root or CAP_SYS_NICE; an
  executor without it leaves agents at the Podman service's own nice value, which is
  then the only lever (start the service niced). Every ``started`` event says the value
  the agent really got.

Docs: docs/threat-model.md.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vigil.errors import SettingsError
from vigil_executor.settings import ExecutorSettings

log = structlog.get_logger("vigil.executor.isolation")

SECCOMP_NAME = "vigil"  # the profile's name on started events
SECCOMP_FILE = "seccomp.json"

# Namespace flags of clone(2)/unshare(2) (linux/sched.h). Only CLONE_NEWUSER needs no
# capability; the others need CAP_SYS_ADMIN in the owning user namespace, which an agent
# has only inside a nested user namespace. All are refused: none is needed by an agent.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                   CLONE_NEWPID, CLONE_NEWNET)
EPERM = 1
ENOSYS = 38
# Mounting, unmounting, changing root, joining namespaces: never an agent's business.
DENIED = ("mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount",
          "fspick", "move_mount", "open_tree", "mount_setattr", "setns")
FLAG_FILTERED = ("clone", "unshare")  # x86_64 (and arm64): the flags are argument 0
NOT_IMPLEMENTED = ("clone3",)


def seccomp_profile(base: dict[str, Any]) -> dict[str, Any]:
    """Podman's default profile (``base``), with nested namespaces and mounts refused.

    The named calls leave every allow rule of ``base``; ``clone``/``unshare`` are allowed
    again only without a namespace flag (one EPERM rule per flag: seccomp's masked
    comparison tests "equal", not "any bit set"), ``clone3`` answers ENOSYS, the mount
    family EPERM. A pure function of its input, so the same base gives the same profile.
    """
    profile = copy.deepcopy(base)
    removed = set(DENIED) | set(FLAG_FILTERED) | set(NOT_IMPLEMENTED)
    rules = []
    for rule in profile.get("syscalls") or []:
        if rule.get("action") == "SCMP_ACT_ALLOW":
            names = [n for n in rule.get("names") or [] if n not in removed]
            if not names:
                continue
            rule = {**rule, "names": names}
        rules.append(rule)
    mask = 0
    for flag in NAMESPACE_FLAGS:
        mask |= flag
    rules.append({"names": list(FLAG_FILTERED), "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]})
    rules.extend({"names": list(FLAG_FILTERED), "action": "SCMP_ACT_ERRNO",
                  "errnoRet": EPERM, "args": [
                      {"index": 0, "value": flag, "valueTwo": flag,
                       "op": "SCMP_CMP_MASKED_EQ"}]} for flag in NAMESPACE_FLAGS)
    rules.append({"names": list(NOT_IMPLEMENTED), "action": "SCMP_ACT_ERRNO",
                  "errnoRet": ENOSYS})
    rules.append({"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM})
    profile["syscalls"] = rules
    return profile


def install_seccomp(base_path: str, state_dir: Path) -> Path:
    """Write the hardened profile of ``base_path`` (Podman's default profile) into the
    state directory, world-readable (Podman's user reads it at every create), and return
    its path. A missing or unreadable base stops the executor: agents are not run with
    less than the profile promises."""
    try:
        base = json.loads(Path(base_path).read_text(encoding="utf-8"))
        if not isinstance(base, dict) or not isinstance(base.get("syscalls"), list):
            raise ValueError("not a seccomp profile (no syscalls list)")
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"cannot read the seccomp profile to harden agents' syscalls from {base_path} "
            f"({exc}); install Podman's (containers-common's seccomp.json) or point "
            "VIGIL_SECCOMP_BASE at a profile") from exc
    path = state_dir / SECCOMP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(seccomp_profile(base)), encoding="utf-8")
    os.chmod(tmp, 0o644)  # read by Podman's user; holds no secret
    tmp.replace(path)
    return path


def subordinate_ids(info: dict[str, Any]) -> int:
    """How many subordinate uids the rootless Podman user has (Podman's ``/info``): its
    user namespace maps its own uid to 0 and the subordinate ranges from 1 on."""
    uidmap = ((info.get("host") or {}).get("idMappings") or {}).get("uidmap") or []
    return sum(int(m.get("size", 0)) for m in uidmap
               if isinstance(m, dict) and int(m.get("container_id", 0)) >= 1)


def check_userns_room(info: dict[str, Any], size: int, slots: int) -> None:
    """Refuse to start an executor whose slots cannot all get a user namespace of
    ``size`` ids: the agents past the room would fail to start, one by one, at run time."""
    if size == 0:
        return
    have = subordinate_ids(info)
    if have < size * slots:
        raise SettingsError(
            f"the Podman user's subordinate id range holds {have} ids: room for "
            f"{have // size} agents of VIGIL_USERNS_SIZE={size}, fewer than VIGIL_SLOTS="
            f"{slots}. Grow it (VIGIL_SLOTS={slots} scripts/setup-host.sh, then `podman "
            "system migrate` as that user while no agent runs), or lower VIGIL_SLOTS or "
            "VIGIL_USERNS_SIZE")


def peer_pid(socket_path: str) -> int | None:
    """The pid of the process serving a unix socket (SO_PEERCRED), None if unknown."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(socket_path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None


AUTOGROUP_SWITCH = "/proc/sys/kernel/sched_autogroup_enabled"


def autogroup_enabled() -> bool:
    """Whether the kernel groups processes by session for the CPU (``autogroup``, on by
    default on Debian and Ubuntu). Then a nice value weighs only against processes of
    the same session: an agent (runc makes it a session of its own) at nice 10 still
    gets as much CPU as each of Vigil's services, whatever their nice. The session's own
    weight is its autogroup's nice value (``/proc/<pid>/autogroup``), which the
    executor lowers too (see :func:`lower_autogroup`)."""
    try:
        return Path(AUTOGROUP_SWITCH).read_text(encoding="ascii").strip() == "1"
    except OSError:
        return False  # a kernel without autogroup: nice values weigh host-wide


def lower_autogroup(name: str, nice: int, dir_fd: int | None = None) -> bool:
    """Lower the autogroup (the session's CPU weight) of the process whose procfs
    directory is ``name`` (relative to ``dir_fd`` if given) to ``nice``, never raising
    it. True if it was lowered now. A process that is gone, or a kernel without
    autogroup, changes nothing."""
    try:
        fd = os.open(f"{name}/autogroup", os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        # "/autogroup-41 nice 0"
        current = int(os.read(fd, 128).split()[-1])
        if current >= nice:
            return False
        os.write(fd, str(nice).encode())
        return True
    except (OSError, ValueError, IndexError):
        return False
    finally:
        os.close(fd)


def lower_priority(pid: int, nice: int) -> int | None:
    """Lower process ``pid`` to ``nice``, and its session's autogroup with it (never
    raise either: what is already lower keeps its value), and return the nice value it
    has then, None if it cannot be read. Needs root or CAP_SYS_NICE unless the process
    is the caller's own uid's; without them the process keeps its value (said once in
    the log, and by the value returned)."""
    lower_autogroup(f"/proc/{pid}", nice)
    current = nice_of(pid)
    if current is not None and current < nice:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except PermissionError as exc:
            global _warned_nice  # one warning per process, not one per agent
            if not _warned_nice:
                _warned_nice = True
                log.warning("agents_not_deprioritised", error=exc.strerror, nice=current,
                            note="lowering an agent's priority needs root or "
                            "CAP_SYS_NICE: agents run at the Podman service's nice value "
                            "(start it with `nice -n 10`)")
        except ProcessLookupError:
            return None  # gone already: its exit says the rest
        current = nice_of(pid)
    return current


_warned_nice = False


def priority(nice: int | None) -> dict[str, Any]:
    """The ``priority`` entry of ``Started.resources``: the agent's nice value, ``by:
    nice`` when it is below this executor's (and so the services'), else ``none``."""
    if nice is None:
        return {"value": None, "by": "none"}
    return {"value": nice, "by": "nice" if nice > os.getpriority(os.PRIO_PROCESS, 0)
            else "none"}


def nice_of(pid: int) -> int | None:
    """A process's nice value (``/proc/<pid>/stat`` field 19), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[16])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Isolation:
    """What this node applies to every agent, beyond the base sandbox."""

    userns_size: int = 0  # ids per agent's user namespace; 0 = the Podman user's own
    seccomp_path: str | None = None  # the hardened profile; None = Podman's default
    # Where the kernel weighs sessions (autogroup): the nice value the watchdog keeps each
    # of an agent's sessions at (0: not needed, or agents are not lowered).
    autogroup_nice: int = 0

    def resources(self) -> dict[str, dict[str, Any]]:
        """Entries of ``Started.resources``: how this node enforces each of these."""
        out: dict[str, dict[str, Any]] = {
            "userns": ({"value": f"auto:{self.userns_size}", "by": "podman"}
                       if self.userns_size else {"value": "shared", "by": "none"}),
            "seccomp": ({"value": SECCOMP_NAME, "by": "seccomp"}
                        if self.seccomp_path else {"value": "podman-default",
                                                   "by": "seccomp"}),
        }
        return out  # and "priority", per agent: see priority()


def prepare(conf: ExecutorSettings, info: dict[str, Any], podman_socket: str,
            state_dir: Path) -> Isolation:
    """This node's isolation, at start: the user namespaces' room checked against the
    slots, the seccomp profile installed, and a warning when agents cannot be lowered in
    priority (no privilege to, and the Podman service, whose children they are, is not
    lower itself). Raises SettingsError where a guarantee cannot hold."""
    check_userns_room(info, conf.userns_size, conf.slots)
    security = (info.get("host") or {}).get("security") or {}
    base = conf.seccomp_base or str(security.get("seccompProfilePath") or "")
    if not base:
        raise SettingsError("the Podman service reports no seccomp profile of its own; "
                            "set VIGIL_SECCOMP_BASE to one (Podman's seccomp.json format)")
    seccomp = install_seccomp(base, state_dir)
    isolation = Isolation(userns_size=conf.userns_size, seccomp_path=str(seccomp),
                          autogroup_nice=conf.agent_nice if autogroup_enabled() else 0)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    pid = peer_pid(podman_socket)
    service = nice_of(pid) if pid is not None else None
    if conf.agent_nice and os.geteuid() != 0 and (service is None or service <= own):
        # Without root, CAP_SYS_NICE may still be there (the log says so per agent if not).
        log.warning("agents_may_not_be_deprioritised", podman_pid=pid, podman_nice=service,
                    executor_nice=own,
                    note="an executor not run as root lowers agents only with "
                    "CAP_SYS_NICE; else start the Podman service niced (`nice -n 10 "
                    "podman system service ...`)")
    log.info("isolation", agent_nice=conf.agent_nice, podman_nice=service,
             autogroup=bool(isolation.autogroup_nice),
             **{k: v["value"] for k, v in isolation.resources().items()})
    return isolation
