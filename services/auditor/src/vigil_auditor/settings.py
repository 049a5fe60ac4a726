"""Auditor settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from vigil.messages import ID_PATTERN
from vigil.settings import CommonSettings, default_node_id


class AuditorSettings(CommonSettings, frozen=True, kw_only=True):
    node_id: Annotated[str, Meta(pattern=ID_PATTERN)] = msgspec.field(
        default_factory=default_node_id
    )
    """This instance's name in its confessions and logs. Default: the hostname."""
    webhook_urls: str = ""
    """Comma-separated URLs that receive every alert as a signed JSON POST."""
    webhook_secret: str = ""
    """Shared secret for the X-Vigil-Signature HMAC (required with webhook_urls)."""
    webhook_max_attempts: Annotated[int, Meta(ge=1, le=50)] = 6
    """Deliveries of one alert before it is recorded as failed (backoff 1, 2, 4 … 60 s)."""
    webhook_timeout_s: Annotated[float, Meta(gt=0, le=120)] = 5.0
    """Per-request timeout of a webhook delivery."""
    triage_attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    """Deliveries of a confession whose triage keeps failing (a bug, an unreadable incident)
    before it is given up: its record notes the error, the auditor confesses it, and it is
    acked. Retried after 0.5, 1, 2 … s meanwhile; confessions are triaged in order, so every
    other one waits: keep it small."""

    def __post_init__(self) -> None:
        if self.webhook_urls and not self.webhook_secret:
            raise ValueError("VIGIL_WEBHOOK_SECRET is required when VIGIL_WEBHOOK_URLS is set "
                             "(receivers verify each alert's signature with it)")

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.webhook_urls.split(",") if u.strip()]

    @property
    def node(self) -> str:
        return self.node_id
