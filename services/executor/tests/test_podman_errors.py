"""Unit tests: a Podman failure is classified once, into a typed error that says whether
it is the host's (the task is handed back, no attempt spent) or the task's own. The
messages are Podman 4.3's and catatonit's, as seen on our hosts."""

from __future__ import annotations

import json

import pytest

from vigil.errors import ImageNotFound
from vigil_executor.podman_errors import (
    PodmanConflict,
    PodmanError,
    PodmanNotFound,
    classify,
    error_of,
    init_failure,
)

pytestmark = pytest.mark.unit


def answer(status: int, cause: str, message: str) -> bytes:
    return json.dumps({"cause": cause, "message": message, "response": status}).encode()


HOST = [
    # EAGAIN: the rootless user's processes at RLIMIT_NPROC (another agent forked to it).
    (500, "OCI runtime error", "runc: runc create failed: unable to start container process: "
     "can't fork: resource temporarily unavailable: OCI runtime error", "eagain"),
    (500, "no space left on device", "creating container storage: write /home/vigil/.local/"
     "share/containers/storage/overlay/l/X: no space left on device", "storage_full"),
    (500, "disk quota exceeded", "write /x: disk quota exceeded", "storage_full"),
    (500, "invalid argument", "mounting storage for container 3f2a: creating overlay mount to "
     "/home/vigil/.local/share/containers/storage/overlay/3f2a/merged: invalid argument",
     "storage_mount"),
    (500, "exit status 1", "fuse-overlayfs: cannot mount: No such device", "storage_mount"),
    (500, "cannot allocate memory", "fork/exec /usr/bin/conmon: cannot allocate memory",
     "memory"),
    (500, "layer not known", "layer not known", "storage_corrupt"),
    (500, "database is locked", "acquiring lock 3: database is locked", "podman_db"),
    # Every subordinate id of the Podman user is in running agents' namespaces.
    (500, "could not find enough available IDs", "creating container storage: could not find "
     "enough available IDs", "userns_exhausted"),
    # Any other 5xx: the service's failure (a mount source it cannot stat, a conmon crash).
    (500, "no such file or directory", "statfs /tmp/vigil-executor-n1/control/t-a1: no such "
     "file or directory", "podman_5xx"),
    (503, "", "service unavailable", "podman_5xx"),
]


@pytest.mark.parametrize(("status", "cause", "message", "expected"), HOST)
def test_host_failures_are_retryable(status: int, cause: str, message: str,
                                     expected: str) -> None:
    err = error_of(status, answer(status, cause, message), "/containers/x/start")
    assert isinstance(err, PodmanError)
    assert (err.cause, err.retryable, err.status) == (expected, True, status)
    assert message in str(err)


TASK = [
    (500, "executable file not found in $PATH", "runc: runc create failed: unable to start "
     "container process: exec: \"frob\": executable file not found in $PATH: OCI runtime "
     "error", "command_not_found"),
    (500, "workdir \"/nope\" does not exist on container 7ae6", "workdir \"/nope\" does not "
     "exist on container 7ae6", "workdir_invalid"),
    (400, "bad parameter", "decode(): json: cannot unmarshal string into Go struct field",
     "rejected"),
]


@pytest.mark.parametrize(("status", "cause", "message", "expected"), TASK)
def test_the_tasks_own_failures_are_not(status: int, cause: str, message: str,
                                        expected: str) -> None:
    err = error_of(status, answer(status, cause, message), "/containers/x/start")
    assert isinstance(err, PodmanError)
    assert (err.cause, err.retryable) == (expected, False)


def test_names_in_use_and_missing_objects_have_their_own_types() -> None:
    # Podman 4.3 answers 500, not 409, for both of these: the cause says it.
    in_use = error_of(500, answer(500, "that name is already in use", "creating container "
                                "storage: the container name \"c1\" is already in use by 6f"),
                    "/containers/create")
    exists = error_of(500, answer(500, "volume already exists", "volume with name v1 already "
                                "exists: volume already exists"), "/volumes/create")
    gone = error_of(404, answer(404, "no such container", "no container with name or ID "
                              "\"c1\" found: no such container"), "/containers/c1/start")
    assert isinstance(in_use, PodmanConflict) and isinstance(exists, PodmanConflict)
    assert not in_use.retryable and not exists.retryable
    assert isinstance(gone, PodmanNotFound) and not gone.retryable


def test_a_missing_image_is_its_own_error() -> None:
    err = error_of(500, answer(500, "image not known", "localhost/nope:1: image not known"),
                 "/containers/create")
    assert isinstance(err, ImageNotFound)


def test_a_body_that_is_not_json_is_classified_by_status() -> None:
    err = error_of(502, b"<html>Bad Gateway</html>", "/containers/create")
    assert isinstance(err, PodmanError) and err.retryable and err.cause == "podman_5xx"
    assert classify(0, "something else") == ("podman", False)


def test_catatonit_failing_to_fork_the_agent_is_the_hosts_failure() -> None:
    """What a container printed when its init could not fork the agent (measured here
    with RLIMIT_NPROC at 1)."""
    err = init_failure([
        "ERROR (catatonit:1): failed to fork child: Resource temporarily unavailable",
        "ERROR (catatonit:1): failed to spawn pid1: Resource temporarily unavailable"])
    assert err is not None and err.retryable and err.cause == "eagain"
    assert str(err) == ("the container's init could not start the agent: failed to spawn "
                        "pid1: Resource temporarily unavailable")


def test_catatonit_failing_to_exec_the_command_is_the_tasks() -> None:
    err = init_failure(["ERROR (catatonit:6): failed to exec pid1: No such file or directory",
                        ""])
    assert err is not None and not err.retryable and err.cause == "command_not_runnable"


@pytest.mark.parametrize("lines", [
    [],
    ["hello"],
    # The agent ran and printed something: whatever follows is not a start failure.
    ["working", "ERROR (catatonit:1): failed to spawn pid1: Resource temporarily unavailable"],
    ["ERROR (catatonit): failed to spawn pid1: Resource temporarily unavailable"],
])
def test_anything_else_is_no_init_failure(lines: list[str]) -> None:
    assert init_failure(lines) is None
