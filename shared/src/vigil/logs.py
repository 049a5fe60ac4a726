"""Logging: structlog, JSON when not on a terminal, context bound per task.

Call :func:`setup` once in a service's ``__main__``. Bind ``task_id``/``attempt``/``executor``
with ``structlog.contextvars.bound_contextvars`` so every line inside a handler carries them.
Library logs (nats-py, aiohttp) pass through the same renderer. A handler that holds
secret values calls :func:`redact`: its lines' text passes through the mask it gives.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup(service: str, level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_to_json)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _add_service(service),
            _redacted,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # aiohttp's access log is one line per request: keep it at debug.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_encoder = msgspec.json.Encoder(enc_hook=str)


def _to_json(obj: Any, **_: Any) -> str:
    # msgspec renders a log line several times faster than json.dumps; a line per task
    # is on every service's hot path.
    return _encoder.encode(obj).decode()


def _add_service(service: str) -> Any:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return processor


_RAW = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})
_redact: ContextVar[Callable[[str], str] | None] = ContextVar("vigil_log_redact", default=None)


def redact(mask: Callable[[str], str]) -> None:
    """From now on in this context (the running asyncio task, and the tasks it starts
    from now on), every log line's text passes through ``mask`` before it is written:
    a task's secret values never reach a log, whatever a message or an error says."""
    _redact.set(mask)


def _redacted(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    mask = _redact.get()
    if mask is None:
        return event
    # exc_info/stack_info of a library's record are rendered later, from the record.
    return {key: value if key in _RAW else _mask(value, mask) for key, value in event.items()}


def _mask(value: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return mask(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: _mask(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_mask(v, mask) for v in value]
    return mask(str(value))  # rendered with str() anyway (an exception, a path ...)
