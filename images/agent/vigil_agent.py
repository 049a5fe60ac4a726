"""Vigil agent helper: the agent side of the agent contract, standard library only.

Import it inside an agent container (it is on the default image's ``sys.path``)::

    import vigil_agent as vigil

    vigil.progress(step=3, of=10)
    vigil.confess("git is not installed", severity="error", category="environment",
                  hint="use an image with git")
    if vigil.checkpoint({"step": 3}):
        ...  # the workspace is durably snapshotted

Every call writes one control line on stdout (``::vigil::<command> <json>``) that the
executor turns into an event; ordinary output stays ordinary log lines. A checkpoint
request blocks until the executor reports the snapshot durable (or failed) through the
read-only control directory ``$VIGIL_CONTROL_DIR``; outside Vigil it returns ``False``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

__all__ = [
    "attempt",
    "checkpoint",
    "confess",
    "progress",
    "resumed",
    "task_id",
    "workspace",
]

PREFIX = "::vigil::"
SEVERITIES = ("info", "warning", "error", "critical")
_lock = threading.Lock()
_checkpoint_seq = 0


def task_id() -> str:
    """The task's id (``VIGIL_TASK_ID``); empty outside Vigil."""
    return os.environ.get("VIGIL_TASK_ID", "")


def attempt() -> int:
    """The attempt number, starting at 1 (``VIGIL_ATTEMPT``)."""
    try:
        return int(os.environ.get("VIGIL_ATTEMPT", "1"))
    except ValueError:
        return 1


def resumed() -> bool:
    """True when the workspace was restored from a checkpoint (``VIGIL_RESUMED=1``)."""
    return os.environ.get("VIGIL_RESUMED", "0") == "1"


def workspace() -> str:
    """The writable directory that survives migration (``VIGIL_WORKSPACE``)."""
    return os.environ.get("VIGIL_WORKSPACE", os.getcwd())


def _emit(command: str, payload: dict[str, Any] | None) -> None:
    line = PREFIX + command
    if payload is not None:
        line += " " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str)
    # One write per line under a lock so that threads never interleave control lines,
    # and a flush so the executor sees it now rather than when a buffer fills.
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def confess(
    summary: str,
    severity: str = "warning",
    *,
    category: str | None = None,
    detail: str | None = None,
    hint: str | None = None,
    **extra: Any,
) -> None:
    """Report a problem nobody is watching for.

    ``severity`` is one of ``info``, ``warning``, ``error``, ``critical``. ``category`` groups
    similar problems (``environment``, ``credentials``, ``tooling``, ``loop`` …), ``detail``
    carries evidence and ``hint`` what a human should do about it.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    if not summary or not summary.strip():
        raise ValueError("summary must be a non-empty string")
    payload: dict[str, Any] = {"summary": summary, "severity": severity}
    for key, value in (("category", category), ("detail", detail), ("hint", hint)):
        if value is not None:
            payload[key] = value
    payload.update(extra)
    _emit("confess", payload)


def progress(**fields: Any) -> None:
    """Report progress, e.g. ``progress(step=3, of=10, message="compiling")``."""
    _emit("progress", fields)


def checkpoint(note: dict[str, Any] | None = None, timeout: float = 300.0) -> bool:
    """Ask the executor to snapshot the workspace; return True once it is durable.

    Returns False when the snapshot failed, timed out, or the agent is not running under a
    Vigil executor that supports checkpoints. The agent should not write to the workspace
    until this returns, so that the snapshot is consistent.
    """
    global _checkpoint_seq
    with _lock:
        _checkpoint_seq += 1
        seq = _checkpoint_seq
    payload: dict[str, Any] = {"seq": seq}
    if note:
        payload["note"] = note
    _emit("checkpoint", payload)
    control = os.environ.get("VIGIL_CONTROL_DIR")
    if not control:
        return False
    deadline = time.monotonic() + timeout
    done = os.path.join(control, f"checkpoint-{seq}.json")
    delay = 0.01
    while time.monotonic() < deadline:
        try:
            with open(done, encoding="utf-8") as fh:
                result = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        return bool(result.get("ok"))
    return False
