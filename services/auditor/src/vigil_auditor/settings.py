"""Auditor settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from vigil.settings import CommonSettings


class AuditorSettings(CommonSettings, frozen=True, kw_only=True):
    batch: Annotated[int, Meta(ge=1, le=4096)] = 256
    """Confessions handled concurrently."""
