"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the msgspec types."""

from __future__ import annotations

from typing import Any


def document() -> dict[str, Any]:
    """The API description (placeholder until generated from vigil.api types)."""
    return {"openapi": "3.1.0", "info": {"title": "Vigil gateway", "version": "1"},
            "paths": {}}
