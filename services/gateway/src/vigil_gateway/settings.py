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
    tokens: str = ""
    """The same JSON as a tokens file, inline (for container platforms that inject
    secrets as env); merged with VIGIL_TOKENS_FILE. Digests only, never tokens."""
    rate_limit_rps: Annotated[float, Meta(ge=0)] = 50.0
    """Requests per second per token (a token bucket); 0 turns the limit off."""
    rate_limit_burst: Annotated[int, Meta(ge=1)] = 100
    """Requests a token may make at once before VIGIL_RATE_LIMIT_RPS applies; over it: 429
    with Retry-After."""
    default_tenant: Annotated[str, Meta(pattern=ID_PATTERN)] = "default"
    """With ``VIGIL_AUTH=none``, the tenant every request acts as (unused with tokens,
    which name their own tenant)."""
    submit_wait_s: Annotated[float, Meta(ge=0, le=60)] = 5.0
    """How long POST /v1/tasks waits for the scheduler to accept the task."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024)] = 256 * 1024
    """Request bodies above this get 413 (at most the submit stream's message size)."""
    sse_keepalive_s: Annotated[float, Meta(gt=0, le=300)] = 15.0
    """Comment lines on idle event streams, so proxies keep them open."""
    secrets_key_file: str = ""
    """File of the keys that seal tenants' secrets (``id:base64`` lines of 32-byte keys,
    the first one seals, every one decrypts; ``vigil secret keygen`` prints a line).
    Without it (or VIGIL_SECRETS_KEY), setting a secret is refused, saying so."""
    secrets_key: str = ""
    """The same text as VIGIL_SECRETS_KEY_FILE, inline, its lines also separable by
    commas (for container platforms that inject secrets as environment); the file's keys
    come first when both are set."""

    def __post_init__(self) -> None:
        if self.auth == "tokens" and not self.tokens_file and not self.tokens:
            raise ValueError(
                "VIGIL_TOKENS_FILE (or VIGIL_TOKENS) is required (create one with `vigil token "
                "create`), or set "
                "VIGIL_AUTH=none for an unauthenticated development gateway"
            )
