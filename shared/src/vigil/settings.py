"""Settings: one frozen struct per service, read once from ``VIGIL_*`` environment variables.

A field ``slots`` is read from ``VIGIL_SLOTS``. An optional JSON or TOML file named by
``VIGIL_CONFIG_FILE`` supplies values too; the environment wins over the file. Unknown keys
in the file are errors (a typo in a config file should not pass silently). Nothing else in
Vigil reads ``os.environ``.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import os
import socket
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from vigil.codec import error_field
from vigil.errors import SettingsError

PREFIX = "VIGIL_"
Port = Annotated[int, Meta(ge=0, le=65_535)]
Positive = Annotated[float, Meta(gt=0)]


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings every service shares."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma-separated. Credentials may be given as user:pass@host."""
    http_host: str = "127.0.0.1"
    """Address the health/metrics (and, for the gateway, API) HTTP server binds."""
    http_port: Port = 0
    """Port of that HTTP server; 0 picks a free one (logged at start)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe log lines written (library logs included); ``debug`` is verbose."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """``auto`` is JSON unless stderr is a terminal."""
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    """Stream/bucket replicas when this service creates the topology (3 on a cluster)."""
    output_stream_mb: Annotated[int, Meta(ge=1)] = 10_240
    """Size of ``VIGIL_OUTPUT`` (tasks' log, progress and egress events), MiB, when this
    service creates or updates the topology; its oldest output is dropped when full (never
    a lifecycle event: those are in ``VIGIL_EVENTS``). Set the same on every service."""

    @property
    def output_stream_bytes(self) -> int:
        return self.output_stream_mb * 1024 * 1024


T = TypeVar("T", bound=msgspec.Struct)


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def load(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Read ``cls`` from the environment (and ``VIGIL_CONFIG_FILE``), or raise SettingsError.

    The error names the variable and what was wrong with it, e.g.
    ``VIGIL_SLOTS: Expected `int` >= 1``.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_file = env.get(PREFIX + "CONFIG_FILE")
    if config_file:
        raw.update(_read_file(Path(config_file)))
    names = {f.name for f in msgspec.structs.fields(cls)}
    for name in names:
        value = env.get(env_name(name))
        if value is not None:
            raw[name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        message, path = error_field(exc)
        if path and path.startswith("$."):
            field = path[2:].split("[", 1)[0].split(".", 1)[0]
            origin = env_name(field) if env_name(field) in env else f"{field} in {config_file}"
            raise SettingsError(f"{origin}: {message}") from None
        raise SettingsError(f"invalid settings: {message}") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"VIGIL_CONFIG_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"VIGIL_CONFIG_FILE: {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"VIGIL_CONFIG_FILE: {path} must hold a table/object of settings")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of ``cls`` (and its bases): its documentation."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        first = tree.body[0] if tree.body else None
        body = first.body if isinstance(first, ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe(cls: type[msgspec.Struct]) -> list[tuple[str, str, str, str]]:
    """(variable, default, type, doc) per setting: used by ``--help`` and the README."""
    docs = field_docs(cls)
    rows = []
    for f in msgspec.structs.fields(cls):
        if f.default is not msgspec.NODEFAULT:
            default = str(f.default)
        elif f.default_factory is not msgspec.NODEFAULT:
            default = str(f.default_factory())
        else:
            default = ""
        rows.append((env_name(f.name), default, _type_name(f.type), docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def default_node_id() -> str:
    return socket.gethostname().split(".", 1)[0] or "node"


def redact_url(url: str) -> str:
    """``nats://user:secret@host:4222`` -> ``nats://user:***@host:4222`` for logs."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        if parts.password or parts.username:
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            user = parts.username or ""
            netloc = f"{user}:***@{host}" if parts.password else f"***@{host}"
            part = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        out.append(part.strip())
    return ",".join(out)
