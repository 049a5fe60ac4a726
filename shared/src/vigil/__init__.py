"""Vigil: run long-lived AI agents in the cloud.

This package is the contract library shared by Vigil's services and the public SDK:
message types (:mod:`vigil.messages`), subject names (:mod:`vigil.subjects`), the topology
(:mod:`vigil.topology`), settings, the HTTP client (:class:`vigil.Client`) and the ``vigil``
command line.
"""

from vigil.errors import ApiError, InvalidTask, NatsUnavailable, SettingsError, VigilError
from vigil.messages import STATUSES, TERMINAL, Confession, TaskSpec, TaskState, WorkItem

__version__ = "0.3.0"

__all__ = [
    "STATUSES",
    "TERMINAL",
    "ApiError",
    "Confession",
    "InvalidTask",
    "NatsUnavailable",
    "SettingsError",
    "TaskSpec",
    "TaskState",
    "VigilError",
    "WorkItem",
    "__version__",
]
