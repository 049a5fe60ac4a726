"""Vigil's error hierarchy. Every error says whether retrying can help, and what to do."""

from __future__ import annotations


class VigilError(Exception):
    """Base of every error Vigil raises on purpose.

    ``retryable`` tells a caller whether the same call may succeed later (NATS briefly
    down) or never will (the input is wrong).
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class SettingsError(VigilError):
    """A ``VIGIL_*`` setting is missing or invalid; the message names the variable."""


class InvalidTask(VigilError):
    """A task spec failed validation. ``field`` is a JSON path such as ``$.command[0]``;
    ``malformed`` means the input was not JSON at all."""

    def __init__(self, message: str, *, field: str | None = None, malformed: bool = False) -> None:
        super().__init__(message, retryable=False)
        self.field = field
        self.malformed = malformed


class NatsUnavailable(VigilError):
    """NATS did not answer in time; the operation may be retried."""

    retryable = True


class TopologyError(VigilError):
    """A stream or bucket exists with a configuration Vigil cannot update in place."""


class RuntimeUnavailable(VigilError):
    """The container runtime (Podman API service) cannot be reached."""

    retryable = True


class ImageNotFound(VigilError):
    """The task's image is not present on this node (no registry pulls are attempted)."""


class ApiError(VigilError):
    """The gateway answered an SDK call with an error status."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}", retryable=status in (429, 502, 503, 504))
        self.status = status
        self.field = field
