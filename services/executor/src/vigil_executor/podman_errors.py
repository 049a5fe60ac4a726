"""Podman's failures, classified once: typed errors that say whether a failure is the
host's (retryable: the task is handed back, no attempt spent) or the task's own.

Podman 4.3 answers 500 for most failures, the host's and the request's alike (a name in
use, a missing workdir, EAGAIN from runc), so the answer's ``cause`` and message are read
here, and nowhere else; the container's init (catatonit) has only the container's output
to say it could not start the agent, and that is read here too.
"""

from __future__ import annotations

import json
import re

from vigil.errors import ImageNotFound, VigilError
from vigil_executor.runtime import ContainerError


class PodmanError(ContainerError):
    """An error answer of the Podman API, classified by :func:`classify` where it is read
    (:func:`error_of`); ``status`` is the HTTP status (0 when not an API answer)."""

    def __init__(self, message: str, *, status: int = 0, cause: str = "podman",
                 retryable: bool = False) -> None:
        super().__init__(message, cause=cause, retryable=retryable)
        self.status = status


class PodmanConflict(PodmanError):
    """A container or volume of that name exists already."""


class PodmanNotFound(PodmanError):
    """No such container or volume (any more)."""


# Failures of the host, whatever the task: Go's errno texts and the storage and runtime
# errors Podman wraps them in. Looked for first: a command that cannot be forked or
# exec'd for want of processes is the host's problem, not the command's.
HOST_CAUSES: tuple[tuple[str, str], ...] = (
    ("resource temporarily unavailable", "eagain"),
    ("cannot allocate memory", "memory"),
    ("no space left on device", "storage_full"),
    ("disk quota exceeded", "storage_full"),
    ("too many open files", "files_exhausted"),
    ("input/output error", "storage_io"),
    ("overlay mount", "storage_mount"),  # the container's root filesystem
    ("fuse-overlayfs", "storage_mount"),
    ("mounting storage", "storage_mount"),
    ("layer not known", "storage_corrupt"),
    ("database is locked", "podman_db"),
    # Every subordinate id of the Podman user is taken by running agents' namespaces.
    ("could not find enough available ids", "userns_exhausted"),
)
# Failures of the task's own request: its command, its settings.
TASK_CAUSES: tuple[tuple[str, str], ...] = (
    ("executable file not found", "command_not_found"),
    ("failed to exec pid1", "command_not_runnable"),  # catatonit could not exec it
    ("exec format error", "command_not_runnable"),
    ("workdir", "workdir_invalid"),
)
# What catatonit, the container's init (pid 1), prints when it cannot start the agent, and
# its exit code then; its only channel is the container's output, read here and nowhere
# else. An agent could print the same and exit 1: it gains hand-backs, which the hand-back
# delay and the work consumer's max deliveries bound, as for any host failure.
INIT_FAILED_EXIT = 1
INIT_LINES = 3  # catatonit says at most two lines; a third is the agent's
INIT_OUTPUT_WAIT_S = 10.0  # for the attach stream to end after the exit
INIT_FAILURE = re.compile(
    r"ERROR \(catatonit:\d+\): (failed to (?:fork child|spawn pid1|exec pid1): .*)")


def classify(status: int, text: str) -> tuple[str, bool]:
    """``(cause, retryable)`` of a Podman failure: an API answer's HTTP ``status`` and
    message (its ``cause`` included), or status 0 and the container init's message.

    Host causes first, then the task's; then by status: 404 and 409 are answers about
    names, other 4xx the request's fault, and any other 5xx the service's (Podman answers
    500 for most failures, the host's among them: retried elsewhere, the hand-back delays
    and the work consumer's max deliveries bound the loop)."""
    lowered = text.lower()
    for needle, cause in HOST_CAUSES:
        if needle in lowered:
            return cause, True
    for needle, cause in TASK_CAUSES:
        if needle in lowered:
            return cause, False
    if status == 404 or "no such container" in lowered or "no such volume" in lowered:
        return "not_found", False
    if status == 409 or "already in use" in lowered or "already exists" in lowered:
        return "conflict", False
    if 400 <= status < 500:
        return "rejected", False
    if status >= 500:
        return "podman_5xx", True
    return "podman", False


def init_failure(lines: list[str]) -> ContainerError | None:
    """The init's start failure, when the container's whole output is the init's own
    messages (catatonit prints two when it cannot fork the agent); None otherwise."""
    reasons = [m.group(1) for line in lines if (m := INIT_FAILURE.fullmatch(line.strip()))]
    if not reasons or len(reasons) != len([line for line in lines if line.strip()]):
        return None
    cause, retryable = classify(0, reasons[-1])
    return ContainerError(f"the container's init could not start the agent: {reasons[-1]}",
                          cause=cause, retryable=retryable)


def error_of(status: int, body: bytes, what: str) -> VigilError:
    """The typed error of a Podman API error answer (the one place its text is read)."""
    cause_text = ""
    try:
        answer = json.loads(body)
        message = answer.get("message") or body.decode(errors="replace")
        cause_text = str(answer.get("cause") or "")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")
    if "image not known" in message or "failed to find image" in message:
        return ImageNotFound(
            f"{message}; images are not pulled from registries: build or load it on this node "
            "(the default agent image comes from scripts/build-agent-image.sh)"
        )
    cause, retryable = classify(status, f"{cause_text}\n{message}")
    kind = {"conflict": PodmanConflict, "not_found": PodmanNotFound}.get(cause, PodmanError)
    return kind(f"Podman API {what}: HTTP {status}: {message}", status=status, cause=cause,
                retryable=retryable)
