"""A task's secrets on this node: resolved at the attempt's start, handed to the agent,
masked in everything that comes back, and gone when the attempt ends.

- **Resolve** every ``spec.secrets`` entry (``ENV_NAME -> secret name``) from
  ``vigil-secrets`` and open it with the operator's keyring. A secret the tenant does not
  have, no keyring on this executor, or a value that does not authenticate fails the task
  (:class:`SecretRefused`: retrying cannot help) with a confession that says what to do.
  NATS unreachable, or a value sealed with a key this node lacks (a rotation under way)
  is the platform's trouble: the task is handed back, no attempt spent.
- **Hand over** each value as ``$ENV_NAME`` and as the file ``/run/secrets/ENV_NAME``:
  files 0444 in a directory 0555 per attempt, bind-mounted read-only (nosuid, nodev,
  noexec) from a host directory on tmpfs (never on disk) whose parent is 0700 and owned
  by Podman's user, so no other host user can reach them while any agent uid can read
  them (userns=auto gives agents arbitrary host uids; runc opens the mount source before
  it enters the container's user namespace, measured with Podman 4.3 / runc 1.1).
- **Mask**: :class:`Masker` replaces each value (of 4 characters or more), each line of a
  multi-line value, and its JSON-escaped, URL-encoded and base64 forms with ``***`` in
  the agent's output lines, control payloads (progress, confessions, checkpoint notes),
  the task's stored tail and errors, events, the executor's confessions and its log lines
  (:func:`vigil.logs.redact`).
- **Remove** the attempt's directory at its cleanup; a restarted executor clears what an
  earlier life left (:meth:`SecretFiles.prepare`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import structlog

from vigil import logs
from vigil.errors import NatsUnavailable, SettingsError, VigilError
from vigil.messages import Event, TaskState, WorkItem
from vigil.secrets import SETTINGS_HINT, KeyMissing, Keyring, SecretError, SecretStore
from vigil_executor.claim import HandBack
from vigil_executor.podman_api import socket_path
from vigil_executor.retry import image_missing_delay
from vigil_executor.runtime import TruncatedLine
from vigil_executor.settings import ExecutorSettings
from vigil_executor.sink import EventSink

log = structlog.get_logger("vigil.executor.secrets")

MASK = "***"
MIN_MASKED_CHARS = 4  # shorter values would mask ordinary words; they are not masked
SECRETS_UNREADABLE_DELAY_S = 5.0
TMPFS = frozenset({"tmpfs", "ramfs"})


# masking ------------------------------------------------------------------------------------
def _forms(value: str) -> set[str]:
    """What a value may look like in output: itself, each of its lines, and its common
    encodings."""
    forms = {value, json.dumps(value)[1:-1], quote(value, safe=""),
             base64.b64encode(value.encode()).decode().rstrip("=")}
    forms.update(line.rstrip("\r") for line in value.split("\n"))
    return {f for f in forms if len(f) >= MIN_MASKED_CHARS}


class Masker:
    """Replaces secret values with ``***`` in text and in decoded JSON. Empty (falsy) when
    there is nothing to mask: callers skip it then, at no cost."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        needles = sorted({f for v in values for f in _forms(v)}, key=len, reverse=True)
        self._needles = needles
        self._re = re.compile("|".join(map(re.escape, needles))) if needles else None

    def __bool__(self) -> bool:
        return self._re is not None

    def mask(self, text: str) -> str:
        return text if self._re is None else self._re.sub(MASK, text)

    def mask_cut(self, text: str) -> str:
        """``text`` cut off after its end (a truncated line): also the start of a value it
        ends with, however short, since the rest of the value was cut away."""
        text = self.mask(text)
        for needle in self._needles:
            for n in range(min(len(needle) - 1, len(text)), 0, -1):
                if text.endswith(needle[:n]):
                    return text[:-n] + MASK
        return text

    def mask_any(self, value: Any) -> Any:
        """Strings inside decoded JSON (keys too), masked."""
        if self._re is None:
            return value
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {self.mask_any(k): self.mask_any(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask_any(v) for v in value]
        return value

    def line(self, raw: bytes, text: str) -> str:
        """An output line (``text`` is ``raw`` decoded) with the values masked; a line
        cut at the length limit also loses a value's start at the cut."""
        if self._re is None:
            return text
        if isinstance(raw, TruncatedLine):
            head = raw[:raw.limit].decode("utf-8", errors="replace")
            return self.mask_cut(head) + text[len(head):]
        return self.mask(text)

    def event(self, event: Event) -> Event:
        """``event`` with its text masked (not its task id: it names the subject)."""
        if self._re is None:
            return event
        changes = {}
        for name in event.__struct_fields__:
            if name == "task_id":
                continue
            value = getattr(event, name)
            if isinstance(value, str | list | dict):
                masked = self.mask_any(value)
                if masked != value:
                    changes[name] = masked
        return msgspec.structs.replace(event, **changes) if changes else event

    def state(self, state: TaskState) -> TaskState:
        """``state`` with its error, output tail and attempts' errors masked."""
        if self._re is None:
            return state
        return msgspec.structs.replace(
            state, error=self.mask(state.error) if state.error else state.error,
            tail=[self.mask(line) for line in state.tail],
            history=[msgspec.structs.replace(h, error=self.mask(h.error)) if h.error else h
                     for h in state.history])


NO_MASK = Masker()


# failures -----------------------------------------------------------------------------------
class SecretRefused(VigilError):
    """The task cannot have its secrets, and retrying will not change that: it fails,
    with a confession of ``category`` saying what to do."""

    def __init__(self, message: str, *, category: str, hint: str) -> None:
        super().__init__(message, retryable=False)
        self.category = category
        self.hint = hint


# files on tmpfs -----------------------------------------------------------------------------
def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on (from /proc/self/mountinfo)."""
    target = str(path.resolve())
    best, kind = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(best):
                best, kind = point, right.split()[0]
    return kind


def runtime_uid(conf: ExecutorSettings) -> int:
    """The uid the container runtime runs as: Podman's socket's owner (rootless Podman
    is that user's), or this process's for the unsafe runtimes."""
    if conf.runtime != "podman":
        return os.geteuid()
    return os.stat(socket_path(conf.podman_url)).st_uid


def default_root(owner: int, node_id: str) -> Path:
    run = Path(f"/run/user/{owner}")
    if run.is_dir() and filesystem_of(run) in TMPFS:
        return run / f"vigil-secrets-{node_id}"
    # tmpfs everywhere; the directory is made 0700 (and checked if it exists: prepare).
    return Path("/dev/shm") / f"vigil-secrets-{node_id}"  # noqa: S108


def _remove(path: Path) -> None:
    """Remove an attempt's directory (read-only once written: made writable first)."""
    if not path.exists():
        return
    for d in (path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())):
        os.chmod(d, 0o700)
    shutil.rmtree(path, ignore_errors=True)


class SecretFiles:
    """The node's directory of attempts' secret files: on tmpfs, 0700, owned by the
    runtime's user (Podman mounts from it; nobody else may look in)."""

    def __init__(self, root: Path, owner: int) -> None:
        self.root = root
        self.owner = owner

    @classmethod
    def for_settings(cls, conf: ExecutorSettings) -> SecretFiles:
        owner = runtime_uid(conf)
        root = Path(conf.secrets_dir) if conf.secrets_dir else default_root(owner, conf.node_id)
        return cls(root, owner)

    def prepare(self) -> None:
        """Make (or check) the directory, and clear what an earlier life of this node
        left in it (an executor killed mid-attempt). Refuses one not on tmpfs."""
        fs = filesystem_of(self.root.parent)
        if fs not in TMPFS:
            raise SettingsError(
                f"VIGIL_SECRETS_DIR: {self.root} is on {fs or 'an unknown filesystem'}, not "
                "tmpfs: secrets would reach the disk; choose a directory under /dev/shm or "
                "/run/user/<uid>")
        me = os.geteuid()
        if self.owner != me and me != 0:
            raise SettingsError(
                f"this executor runs as uid {me} and Podman as uid {self.owner}: it cannot "
                f"give Podman a private directory for secrets ({self.root}); run the "
                "executor as Podman's user")
        try:
            os.mkdir(self.root, 0o700)
        except FileExistsError:
            st = os.lstat(self.root)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.owner or st.st_mode & 0o077:
                raise SettingsError(
                    f"VIGIL_SECRETS_DIR: {self.root} exists but is not a directory of uid "
                    f"{self.owner} (Podman's) closed to others (owner {st.st_uid}, mode "
                    f"{stat.filemode(st.st_mode)}); remove it") from None
        else:
            os.chmod(self.root, 0o700)
            if self.owner != me:
                os.chown(self.root, self.owner, -1)  # freshly made: no planted symlink
        for leftover in self.root.iterdir():
            _remove(leftover)
            log.warning("orphan_secrets_removed", path=str(leftover))

    def write(self, name: str, values: Mapping[str, str]) -> Path:
        """``values`` as files ``ENV_NAME`` (0444) of a fresh directory (0555)."""
        d = self.root / name
        _remove(d)
        os.mkdir(d, 0o700)
        try:
            for env_name, value in values.items():
                fd = os.open(d / env_name,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(value.encode())
                os.chmod(d / env_name, 0o444)
            os.chmod(d, 0o555)  # noqa: S103 - any agent uid reads; the 0700 root shuts others out
        except BaseException:
            _remove(d)
            raise
        return d


# an attempt's secrets -------------------------------------------------------------------------
@dataclass
class AttemptSecrets:
    """What one attempt was given: env values, their files' host directory, the masker."""

    env: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    masker: Masker = NO_MASK

    def guard(self, sink: EventSink) -> None:
        """From now on, this attempt's events and this task's log lines are masked."""
        if self.masker:
            sink.mask = self.masker.event
            logs.redact(self.masker.mask)

    def remove(self) -> None:
        if self.directory is not None:
            _remove(self.directory)
            self.directory = None


NO_SECRETS = AttemptSecrets()
Confess = Callable[[str, str, str, str | None], Awaitable[None]]
"""(severity, category, summary, hint): the attempt's own confession."""


class Secrets:
    """The executor's side of secrets: its keyring, the store, the files."""

    def __init__(self, conf: ExecutorSettings, keyring: Keyring | None) -> None:
        self.conf = conf
        self.keyring = keyring
        self.files: SecretFiles | None = None
        self.store: SecretStore | None = None

    def prepare(self, store: SecretStore) -> None:
        """At start: the store, and (with a keyring) the files' directory."""
        self.store = store
        if self.keyring is not None:
            self.files = SecretFiles.for_settings(self.conf)
            self.files.prepare()

    def close(self) -> None:
        """At a clean stop: the node's directory goes too, if no attempt left files in it
        (one that did is cleared when the executor starts again)."""
        if self.files is not None:
            with contextlib.suppress(OSError):
                self.files.root.rmdir()

    async def open(self, work: WorkItem, attempt: int, delivery: int,
                   confess: Confess) -> AttemptSecrets:
        """The secrets ``work`` names, opened and written for ``attempt``; raises
        :class:`SecretRefused` (fail the task) or HandBack (the platform's trouble, which
        ``confess`` is told of; a NATS outage is not: it is all over the logs)."""
        wanted = work.spec.secrets
        if not wanted:
            return NO_SECRETS
        if self.keyring is None or self.files is None or self.store is None:
            raise SecretRefused(
                f"executor {self.conf.node_id} has no key to open secrets with, and the "
                f"task names {len(wanted)}", category="secrets_not_configured",
                hint=SETTINGS_HINT)
        values: dict[str, str] = {}
        for env_name, name in wanted.items():
            try:
                found = await self.store.get(work.tenant, name)
            except NatsUnavailable as exc:
                raise HandBack(f"could not read secret {name!r}: {exc}",
                               SECRETS_UNREADABLE_DELAY_S, kind="secrets unreadable") from exc
            except SecretError as exc:  # not an envelope at all
                raise SecretRefused(str(exc), category="secret_corrupt",
                                    hint=f"set it again (`vigil secret set {name}`)") from exc
            if found is None:
                raise SecretRefused(
                    f"secret {name!r} (for ${env_name}) does not exist in tenant "
                    f"{work.tenant}", category="secret_missing",
                    hint=f"set it (`vigil secret set {name}`, an operator of the tenant) and "
                    "submit the task again, or `vigil replay redrive` it")
            try:
                values[env_name] = self.keyring.open(work.tenant, name, found.sealed)
            except KeyMissing as exc:
                await confess("error", "secret_key_missing",
                              f"executor {self.conf.node_id} cannot open secret {name!r} of "
                              f"tenant {work.tenant}: {exc}; handed the task back",
                              "a key rotation is under way, or this executor was not given "
                              "every key: see `vigil secret rotate --help`")
                raise HandBack(f"cannot open secret {name!r}: {exc}",
                               image_missing_delay(delivery), kind="secret key missing") from exc
            except SecretError as exc:
                raise SecretRefused(str(exc), category="secret_corrupt",
                                    hint="set the secret again; if it recurs, check who "
                                    "writes to vigil-secrets") from exc
        try:
            directory = self.files.write(f"{work.tenant}.{work.task_id}-a{attempt}", values)
        except OSError as exc:  # the node's trouble (tmpfs full ...), not the task's
            error = (f"could not write the secrets' files in {self.files.root} on node "
                     f"{self.conf.node_id}: {exc.strerror or exc}")
            await confess("error", "secret_files_failed", f"{error}; handed the task back",
                          "check the space and permissions of VIGIL_SECRETS_DIR's tmpfs")
            raise HandBack(error, image_missing_delay(delivery),
                           kind="secret files failed") from exc
        return AttemptSecrets(env=values, directory=directory, masker=Masker(values.values()))
