"""Where the ``vigil`` command line finds its gateway and token, and ``vigil config show``.

Each value comes from the first of these that has it:

1. flags ``--gateway URL`` / ``--token T``;
2. environment ``VIGIL_GATEWAY_URL`` / ``VIGIL_TOKEN``;
3. a TOML config file: ``--config PATH``, else ``$VIGIL_CLIENT_CONFIG``, else
   ``$XDG_CONFIG_HOME/vigil/config.toml`` (``~/.config/vigil/config.toml``), with the keys
   ``gateway_url`` and ``token``;
4. ``client.json`` that ``vigil up`` writes into its data directory (``--data-dir``,
   ``$VIGIL_DATA_DIR``, ``.vigil``).

A token is never sent to a gateway it was not configured for: a token from a source that
also names a *different* gateway URL than the one chosen is skipped (so ``--gateway
https://prod…`` does not send the local stack's token from ``.vigil/client.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigil.cli_output import EXIT_OK, EXIT_USAGE, exit_epilog
from vigil.client import Client
from vigil.errors import VigilError

CONFIG_KEYS = ("gateway_url", "token")
DEFAULT_DATA_DIR = ".vigil"

HELP = """\
configuration (first found wins):
  flags       --gateway URL, --token TOKEN
  env         VIGIL_GATEWAY_URL, VIGIL_TOKEN
  file        --config PATH, $VIGIL_CLIENT_CONFIG, or ~/.config/vigil/config.toml
              (TOML: gateway_url = "https://…", token = "vgl_…"; keep it chmod 600)
  vigil up    DIR/client.json (--data-dir DIR, $VIGIL_DATA_DIR, default .vigil)
  `vigil config show` prints what is in effect and where each value came from."""


def environ() -> dict[str, str]:
    """The CLI's one look at the environment."""
    return dict(os.environ)


@dataclass(frozen=True)
class Source:
    name: str
    """Where values come from, for humans: ``--gateway``, ``VIGIL_TOKEN``, a file path."""
    url: str | None = None
    url_origin: str = ""
    token: str | None = None
    token_origin: str = ""


@dataclass(frozen=True)
class ClientConfig:
    url: str | None
    url_origin: str
    token: str | None
    token_origin: str
    config_file: Path
    config_file_state: str
    """``read``, ``not found`` (the default path, which is optional) or ``not used``."""
    data_dir: Path
    warnings: list[str] = field(default_factory=list)

    def require_url(self) -> str:
        if not self.url:
            raise VigilError(
                "no gateway to talk to: start one with `vigil up`, or pass --gateway / set "
                "VIGIL_GATEWAY_URL (and VIGIL_TOKEN), or write gateway_url and token to "
                f"{self.config_file}; `vigil config show` tells what is in effect"
            )
        return self.url


def default_config_path(env: dict[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "vigil" / "config.toml"


def read_config_file(path: Path, *, required: bool, origin: str) -> tuple[dict[str, str], str,
                                                                           list[str]]:
    """(values, state, warnings) of a client config file; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        if required:
            raise VigilError(f"config file {path} (from {origin}) does not exist; create it "
                             "with gateway_url = \"…\" and token = \"…\", or drop "
                             f"{origin}") from None
        return {}, "not found", []
    except OSError as exc:
        raise VigilError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise VigilError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise VigilError(f"config file {path}: unknown key {unknown[0]!r}; the keys are "
                         f"{', '.join(CONFIG_KEYS)}")
    values: dict[str, str] = {}
    for key in CONFIG_KEYS:
        if key in data:
            if not isinstance(data[key], str):
                raise VigilError(f"config file {path}: {key} must be a string (in quotes)")
            values[key] = data[key]
    warnings = []
    if values.get("token") and mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{path} holds a token but other users may read it; "
                        f"run: chmod 600 {path}")
    return values, "read", warnings


def _client_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise VigilError(f"cannot read {path} (written by `vigil up`): {exc}; remove it or "
                         "pass --gateway") from None
    return data if isinstance(data, dict) else {}


def resolve(args: argparse.Namespace, env: dict[str, str] | None = None) -> ClientConfig:
    """The gateway URL and token in effect for ``args``, and where each came from."""
    env = environ() if env is None else env
    sources: list[Source] = [
        Source("flags", url=getattr(args, "gateway", None), url_origin="--gateway",
               token=getattr(args, "token", None),
               token_origin="--token"),  # noqa: S106 - where it came from, not a token
        Source("env", url=env.get("VIGIL_GATEWAY_URL") or None, url_origin="VIGIL_GATEWAY_URL",
               token=env.get("VIGIL_TOKEN") or None,
               token_origin="VIGIL_TOKEN"),  # noqa: S106 - a variable's name, not a token
    ]
    explicit = getattr(args, "config", None)
    if explicit:
        path, origin = Path(explicit), "--config"
    elif env.get("VIGIL_CLIENT_CONFIG"):
        path, origin = Path(env["VIGIL_CLIENT_CONFIG"]), "VIGIL_CLIENT_CONFIG"
    else:
        path, origin = default_config_path(env), ""
    values, state, warnings = read_config_file(path, required=bool(origin), origin=origin)
    sources.append(Source(str(path), url=values.get("gateway_url"), url_origin=str(path),
                          token=values.get("token"), token_origin=str(path)))
    data_dir = Path(getattr(args, "data_dir", None) or env.get("VIGIL_DATA_DIR")
                    or DEFAULT_DATA_DIR)
    client_file = data_dir / "client.json"
    saved = _client_json(client_file)
    sources.append(Source(str(client_file), url=saved.get("url"), url_origin=str(client_file),
                          token=saved.get("token"), token_origin=str(client_file)))

    chosen = next((s for s in sources if s.url), None)
    url = chosen.url if chosen else None
    token_source = next(
        (s for s in sources if s.token and (not s.url or url is None
                                            or _same(s.url, url))), None)
    return ClientConfig(
        url=url, url_origin=chosen.url_origin if chosen else "",
        token=token_source.token if token_source else None,
        token_origin=token_source.token_origin if token_source else "",
        config_file=path, config_file_state=state, data_dir=data_dir, warnings=warnings,
    )


def _same(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def open_client(args: argparse.Namespace, *, platform: bool = False) -> Client:
    """A :class:`Client` configured from ``args``; prints config warnings to stderr.
    With ``platform``, the cross-tenant platform token instead of the tenant's: from
    ``VIGIL_PLATFORM_TOKEN``, else the ``platform_token`` that `vigil up` wrote."""
    config = resolve(args)
    for warning in config.warnings:
        print(f"vigil: warning: {warning}", file=sys.stderr)
    token = config.token
    if platform:
        env = environ()
        token = env.get("VIGIL_PLATFORM_TOKEN") or _client_json(
            config.data_dir / "client.json").get("platform_token")
        if not token:
            raise VigilError("no platform token: set VIGIL_PLATFORM_TOKEN (one comes from "
                             "`vigil token create --platform --role operator`), or run "
                             "`vigil up`, which writes one")
    return Client(config.require_url(), token)


def mask(token: str) -> str:
    """Enough of a token to recognise it, not enough to use it."""
    if len(token) <= 12:
        return "****"
    return f"{token[:8]}…{token[-2:]} ({len(token)} chars)"


def add_client_flags(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--gateway``, ``--token``, ``--config``, ``--data-dir`` on ``parser``.

    They are accepted both before and after the command (``vigil --gateway U list`` and
    ``vigil list --gateway U``); a subcommand's copy must not reset the top-level value,
    hence ``SUPPRESS`` as its default.
    """
    default = None if top_level else argparse.SUPPRESS
    group = parser.add_argument_group("connection (see `vigil config show`)")
    group.add_argument("--gateway", metavar="URL", default=default,
                       help="gateway URL (env VIGIL_GATEWAY_URL)")
    group.add_argument("--token", default=default, help="API token (env VIGIL_TOKEN)")
    group.add_argument("--config", metavar="PATH", default=default,
                       help="client config file (env VIGIL_CLIENT_CONFIG; default "
                       "~/.config/vigil/config.toml)")
    group.add_argument("--data-dir", metavar="DIR", default=default,
                       help="use DIR/client.json written by `vigil up` (env VIGIL_DATA_DIR; "
                       "default .vigil)")


async def cmd_config_show(args: argparse.Namespace) -> int:
    config = resolve(args)
    for warning in config.warnings:
        print(f"vigil: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "gateway_url": config.url, "gateway_url_from": config.url_origin or None,
            "token": mask(config.token) if config.token else None,
            "token_from": config.token_origin or None,
            "config_file": str(config.config_file), "config_file_state": config.config_file_state,
            "data_dir": str(config.data_dir),
        }))
        return EXIT_OK
    rows = [
        ("gateway_url", config.url or "(not set)", config.url_origin),
        ("token", mask(config.token) if config.token else "(not set)", config.token_origin),
        ("config file", str(config.config_file), config.config_file_state),
        ("data dir", str(config.data_dir), "client.json from `vigil up`"),
    ]
    width = max(len(value) for _, value, _ in rows)
    for key, value, origin in rows:
        print(f"{key:>12}  {value:<{width}}  {f'({origin})' if origin else ''}".rstrip())
    if not config.url:
        print("\nno gateway configured: see `vigil config --help`", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cfg = sub.add_parser(
        "config", help="show the gateway URL and token in effect, and where they came from",
        description="Show the client configuration in effect.",
        epilog=HELP + "\n\nexample:\n  vigil config show\n  VIGIL_GATEWAY_URL=http://gw:8080 "
        "vigil config show --json\n\n" + exit_epilog(
            (EXIT_OK, "shown"), (EXIT_USAGE, "no gateway configured, or a bad config file"),
            common=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", help="print each value, its source (token masked)",
        description="Print the gateway URL and token the other commands would use, and where "
        "each came from. The token is masked.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_flags(show)
    show.set_defaults(func=cmd_config_show)
