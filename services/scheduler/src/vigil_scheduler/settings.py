"""Scheduler settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from vigil.settings import CommonSettings


class SchedulerSettings(CommonSettings, frozen=True, kw_only=True):
    default_image: str = "localhost/vigil-agent:latest"
    """Image for tasks that name none."""
    default_timeout_s: Annotated[float, Meta(gt=0)] = 3600.0
    """Wall-clock limit for tasks that set no ``timeout_s``."""
    default_max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    """Attempts for tasks that set no ``max_attempts``."""
    batch: Annotated[int, Meta(ge=1, le=4096)] = 256
    """Submissions handled concurrently (pipelines their JetStream writes)."""
