"""Gateway settings (``VIGIL_*`` environment variables)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from vigil.messages import ID_PATTERN
from vigil.settings import CommonSettings, Port


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 8080
    """Port of the HTTP API (and /healthz, /metrics)."""
    auth: Literal["tokens", "none"] = "tokens"
    """``tokens``: every request needs a bearer token from VIGIL_TOKENS_FILE. ``none``
    (development only) treats every caller as an operator of VIGIL_DEFAULT_TENANT."""
    tokens_file: str = ""
    """JSON file of hashed tokens (see ``vigil token create``)."""
    default_tenant: Annotated[str, Meta(pattern=ID_PATTERN)] = "default"
    submit_wait_s: Annotated[float, Meta(ge=0, le=60)] = 5.0
    """How long POST /v1/tasks waits for the scheduler to accept the task."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024)] = 256 * 1024
    """Request bodies above this get 413 (at most the submit stream's message size)."""
    sse_keepalive_s: Annotated[float, Meta(gt=0, le=300)] = 15.0
    """Comment lines on idle event streams, so proxies keep them open."""

    def __post_init__(self) -> None:
        if self.auth == "tokens" and not self.tokens_file:
            raise ValueError(
                "VIGIL_TOKENS_FILE is required (create one with `vigil token create`), or set "
                "VIGIL_AUTH=none for an unauthenticated development gateway"
            )
