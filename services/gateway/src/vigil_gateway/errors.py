"""JSON error responses: one shape everywhere, naming the field when there is one.

    {"error": {"code": "invalid_field", "message": "...", "field": "$.command"}}
"""

from __future__ import annotations

from aiohttp import web


def error(status: int, code: str, message: str, *, field: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, object] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response({"error": body}, status=status, headers=headers)
