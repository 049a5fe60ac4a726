"""The exit statuses `vigil --help` and the README document, as a script gets them: the real
`vigil` command (a subprocess of .venv/bin/vigil) against a real gateway, scheduler and
executor on a real nats-server. One test per status, or per way of reaching it; 130
(Ctrl-C) is left to the unit tests (shared/tests/test_cli_exit_codes.py), as a signal
sent "while it waits" cannot be timed without a sleep."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import CliResult, Platform, eventually, run_vigil
from vigil import auth
from vigil.cli_output import (
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_TASK_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

pytestmark = pytest.mark.integration

IDLE = ["--pool", "idle"]  # no executor serves it: a task there stays queued


@dataclass
class Cli:
    url: str
    tokens: dict[str, str]  # role -> a token of tenant acme
    home: Path

    async def __call__(self, *argv: str, role: str = "submitter", **env: str) -> CliResult:
        return await run_vigil(self.home, self.url, self.tokens[role], *argv, **env)


async def start(platform: Platform, tmp_path: Path, *, executor: bool = True,
                scheduler: dict[str, Any] | None = None,
                gateway: dict[str, Any] | None = None) -> Cli:
    """A scheduler (with ``scheduler`` settings), an executor of pool default (the process
    runtime), a gateway that checks tokens (with ``gateway`` settings), and the CLI."""
    tokens_file = tmp_path / "tokens.json"
    tokens = {role: auth.add_token(tokens_file, role, "acme", role)
              for role in ("viewer", "submitter", "operator")}
    await platform.scheduler(**(scheduler or {}))
    if executor:
        await platform.executor()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens_file), **(gateway or {}))
    home = tmp_path / "home"
    home.mkdir()
    return Cli(f"http://127.0.0.1:{gw.http_port}", tokens, home)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_0_succeeded_and_1_ended_otherwise_or_no_such_task(platform: Platform,
                                                                tmp_path: Path) -> None:
    cli = await start(platform, tmp_path)
    ok = await cli("submit", "--wait", "--json", "--", "true")
    assert ok.code == EXIT_OK, ok.err
    assert ok.json()["status"] == "succeeded"
    failed = await cli("submit", "--wait", "--max-attempts", "1", "--", "false")
    assert failed.code == EXIT_TASK_FAILED, failed.err
    assert "failed" in failed.out
    listed = await cli("list", "--json")
    assert listed.code == EXIT_OK and "tasks" in listed.json(), listed.err

    queued = await cli("submit", "--json", *IDLE, "--", "true")
    assert queued.code == EXIT_OK, queued.err
    task_id = queued.json()["id"]
    cancelled = await cli("cancel", task_id)  # a queued task ends cancelled at once
    assert cancelled.code == EXIT_OK, cancelled.err
    waited = await cli("wait", task_id, "--json")
    assert waited.code == EXIT_TASK_FAILED and waited.json()["status"] == "cancelled"

    missing = await cli("status", "no-such-task")  # HTTP 404
    assert missing.code == EXIT_TASK_FAILED and "no task 'no-such-task'" in missing.err


async def test_2_bad_usage_and_refused_requests(platform: Platform, tmp_path: Path) -> None:
    cli = await start(platform, tmp_path, executor=False)
    flag = await cli("list", "--no-such-flag")
    assert flag.code == EXIT_USAGE and "unrecognized arguments" in flag.err
    invalid = await cli("submit", "--timeout", "-1", "--", "true")  # HTTP 422
    assert invalid.code == EXIT_USAGE, invalid.err
    assert "submission refused: HTTP 422" in invalid.err and "timeout_s" in invalid.err
    unknown = await cli("list", VIGIL_TOKEN="vgl_not_a_token")  # HTTP 401
    assert unknown.code == EXIT_USAGE and "VIGIL_TOKEN" in unknown.err
    viewer = await cli("submit", "--", "true", role="viewer")  # HTTP 403
    assert viewer.code == EXIT_USAGE and "HTTP 403" in viewer.err
    first = await cli("submit", "--id", "twice", *IDLE, "--", "true")
    assert first.code == EXIT_OK, first.err
    again = await cli("submit", "--id", "twice", *IDLE, "--", "true")  # HTTP 409
    assert again.code == EXIT_USAGE and "already exists" in again.err


async def test_3_no_gateway_or_a_failing_one(platform: Platform, tmp_path: Path) -> None:
    cli = await start(platform, tmp_path, executor=False)
    nowhere = await cli("list", VIGIL_GATEWAY_URL=f"http://127.0.0.1:{closed_port()}")
    assert nowhere.code == EXIT_UNREACHABLE and "cannot reach the gateway" in nowhere.err
    # HTTP 503: this gateway has no key to seal secrets with.
    value = cli.home / "value.txt"
    value.write_text("s3cret")
    unsealed = await cli("secret", "set", "api-key", "--from-file", str(value),
                         role="operator")
    assert unsealed.code == EXIT_UNREACHABLE, unsealed.err
    assert "HTTP 503" in unsealed.err and "no key to seal secrets" in unsealed.err


async def test_4_rate_limited(platform: Platform, tmp_path: Path) -> None:
    # One request at once, then one every 1000 s: the second is refused with a Retry-After
    # longer than the SDK waits out, so the CLI reports it at once.
    cli = await start(platform, tmp_path, executor=False,
                      gateway={"rate_limit_rps": 0.001, "rate_limit_burst": 1})

    async def refused() -> CliResult | None:
        got = await cli("list")
        assert got.code in (EXIT_OK, EXIT_RATE_LIMITED), got.err
        return got if got.code == EXIT_RATE_LIMITED else None

    limited = await eventually(refused, what="the gateway to rate-limit the token")
    assert "HTTP 429" in limited.err
    assert "the gateway is rate limiting this token: retry in" in limited.err


async def test_4_over_the_tenants_quota(platform: Platform, tmp_path: Path) -> None:
    cli = await start(platform, tmp_path, executor=False,
                      scheduler={"tenant_limits": json.dumps({"acme": {"max_queued": 1}})})

    # The scheduler admits against its own reading of the queue's depth, which may be up
    # to half a second old: submit until it counts what is queued already.
    async def refused() -> CliResult | None:
        got = await cli("submit", *IDLE, "--", "true")
        assert got.code in (EXIT_OK, EXIT_RATE_LIMITED), got.err
        return got if got.code == EXIT_RATE_LIMITED else None

    over = await eventually(refused, what="a submission over the max_queued limit")
    assert "HTTP 429" in over.err and "(limit 1)" in over.err
    assert "the tenant is over one of its limits: retry in 5s" in over.err


async def test_124_wait_timeout_on_a_task_that_cannot_finish(platform: Platform,
                                                             tmp_path: Path) -> None:
    cli = await start(platform, tmp_path, executor=False)
    queued = await cli("submit", "--json", *IDLE, "--", "true")
    assert queued.code == EXIT_OK, queued.err
    task_id = queued.json()["id"]
    waited = await cli("wait", task_id, "--timeout", "0.5", "--json")
    assert waited.code == EXIT_TIMEOUT, waited.err
    assert "did not finish within 0.5s (still queued)" in waited.err
    assert waited.json()["status"] == "queued"
    cancelled = await cli("cancel", task_id, "--wait", "--timeout", "30")
    assert cancelled.code == EXIT_OK, cancelled.err
