"""Unit tests: how an error (the gateway's answer, or one of the CLI's own) becomes an exit
status, and that `vigil --help`, the subcommands' help and the README say the same. The
real gateway's answers are in tests/test_cli_exit_codes.py."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vigil import cli
from vigil.cli_output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_STATUSES,
    EXIT_TASK_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    error_text,
    exit_code,
    exit_epilog,
)
from vigil.client import Client, GatewayError, WaitTimeout
from vigil.errors import ApiError, InvalidTask, NatsUnavailable, SettingsError, VigilError

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"

# Every status the gateway answers with (services/gateway), and what a script gets.
GATEWAY_ANSWERS = [
    (400, "invalid_json", EXIT_USAGE), (400, "invalid_query", EXIT_USAGE),
    (401, "unauthenticated", EXIT_USAGE), (403, "forbidden", EXIT_USAGE),
    (404, "not_found", EXIT_TASK_FAILED), (409, "exists", EXIT_USAGE),
    (409, "conflict", EXIT_USAGE), (409, "not_kept", EXIT_USAGE),
    (413, "body_too_large", EXIT_USAGE), (422, "invalid_field", EXIT_USAGE),
    (422, "rejected", EXIT_USAGE), (429, "rate_limited", EXIT_RATE_LIMITED),
    (429, "quota_exceeded", EXIT_RATE_LIMITED), (500, "internal", EXIT_UNREACHABLE),
    (502, "error", EXIT_UNREACHABLE), (503, "unavailable", EXIT_UNREACHABLE),
    (503, "warming_up", EXIT_UNREACHABLE), (504, "error", EXIT_UNREACHABLE),
]


@pytest.mark.parametrize(("status", "code", "expected"), GATEWAY_ANSWERS)
def test_each_gateway_answer_has_its_exit_status(status: int, code: str,
                                                 expected: int) -> None:
    assert exit_code(GatewayError(status, code, "no")) == expected
    assert exit_code(ApiError(status, "no")) == expected  # without the gateway's code


@pytest.mark.parametrize(("error", "expected"), [
    (VigilError("cannot reach the gateway at http://x", retryable=True), EXIT_UNREACHABLE),
    (NatsUnavailable("cannot reach NATS"), EXIT_UNREACHABLE),
    (VigilError("--limit takes a number of tasks"), EXIT_USAGE),
    (SettingsError("VIGIL_X is not a number"), EXIT_USAGE),
    (InvalidTask("bad spec", field="$.command"), EXIT_USAGE),
    (WaitTimeout("t1", 2.0, None), EXIT_TIMEOUT),
])
def test_the_clis_own_errors_have_theirs(error: VigilError, expected: int) -> None:
    assert exit_code(error) == expected


def test_messages_say_what_to_do_next() -> None:
    assert "VIGIL_TOKEN" in error_text(GatewayError(401, "unauthenticated", "no token"))
    assert "role" in error_text(GatewayError(403, "forbidden", "needs operator"))
    limited = error_text(GatewayError(429, "rate_limited", "too many", retry_after=3))
    assert "rate limiting this token: retry in 3s" in limited
    quota = error_text(GatewayError(429, "quota_exceeded", "4 queued (limit 3)",
                                    retry_after=5))
    assert "over one of its limits: retry in 5s" in quota and "rate limiting" not in quota
    assert "retry later" in error_text(ApiError(429, "slow down"))
    assert "see its log" in error_text(GatewayError(503, "unavailable", "NATS is down"))
    assert error_text(GatewayError(422, "invalid_field", "must be > 0",
                                   field="$.timeout_s")).endswith("(field $.timeout_s)")
    assert error_text(VigilError("plain")) == "plain"


# through main(): a command, the gateway's answer, the exit status and message -----------------
@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file, client.json or VIGIL_* variable of the machine running the tests."""
    for key in [k for k in os.environ if k.startswith("VIGIL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("VIGIL_DATA_DIR", str(tmp_path / "data"))


def answering(monkeypatch: pytest.MonkeyPatch, error: GatewayError) -> list[str]:
    """Make every request of the SDK get ``error``; returns the paths asked for."""
    asked: list[str] = []

    async def refuse(self: Client, method: str, path: str, **_: Any) -> tuple[int, Any]:
        asked.append(f"{method} {path}")
        raise error

    monkeypatch.setattr(Client, "_request_once", refuse)
    return asked


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--gateway", "http://gateway.invalid", *argv])
    code = exit_.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


# A Retry-After past the SDK's own patience: it does not retry, the CLI reports at once.
LATER = 3600.0


@pytest.mark.usefixtures("no_config")
@pytest.mark.parametrize(("status", "code", "expected"), GATEWAY_ANSWERS)
@pytest.mark.parametrize("argv", [("list",), ("status", "t1"), ("wait", "t1"),
                                  ("executors",), ("env", "show", "e1"),
                                  ("secret", "list"), ("incidents",)])
def test_every_command_maps_the_gateways_answer_alike(
        argv: tuple[str, ...], status: int, code: str, expected: int,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    asked = answering(monkeypatch, GatewayError(status, code, "refused", retry_after=LATER))
    got, err = run(capsys, *argv)
    assert got == expected, err
    assert asked and err.startswith("vigil: HTTP ")


@pytest.mark.usefixtures("no_config")
def test_submit_names_the_refusal_and_maps_it_as_every_command_does(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    answering(monkeypatch, GatewayError(422, "invalid_field", "Expected `float` > 0.0",
                                        field="$.timeout_s"))
    code, err = run(capsys, "submit", "--", "true")
    assert code == EXIT_USAGE
    assert err == ("vigil: submission refused: HTTP 422: Expected `float` > 0.0 "
                   "(field $.timeout_s)\n")
    answering(monkeypatch, GatewayError(429, "quota_exceeded", "4 queued (limit 3)",
                                        retry_after=5))
    code, err = run(capsys, "submit", "--", "true")
    assert code == EXIT_RATE_LIMITED and "over one of its limits: retry in 5s" in err
    answering(monkeypatch, GatewayError(401, "unauthenticated", "unknown token"))
    code, err = run(capsys, "submit", "--", "true")
    assert code == EXIT_USAGE and "VIGIL_TOKEN" in err
    answering(monkeypatch, GatewayError(503, "unavailable", "NATS is down", retry_after=LATER))
    assert run(capsys, "submit", "--", "true")[0] == EXIT_UNREACHABLE


@pytest.mark.usefixtures("no_config")
def test_no_gateway_configured_and_bad_flags_are_usage(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["list"])
    assert exit_.value.code == EXIT_USAGE
    assert "no gateway to talk to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["list", "--no-such-flag"])
    assert exit_.value.code == EXIT_USAGE


@pytest.mark.usefixtures("no_config")
def test_interrupted(monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    async def interrupted(self: Client, *_: Any, **__: Any) -> tuple[int, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "_request_once", interrupted)
    assert run(capsys, "list")[0] == EXIT_INTERRUPTED


# the help and the README say the same ------------------------------------------------------
def parsers(parser: argparse.ArgumentParser, path: str = "") -> Iterator[
        tuple[str, argparse.ArgumentParser, bool]]:
    """Every command as typed (``secret keygen``; ``secret`` too), its parser, and whether
    it is one that runs (no actions under it)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    yield path, parser, not subs
    for action in subs:
        for name, child in action.choices.items():
            yield from parsers(child, f"{path} {name}".strip())


def leaves(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    return ((name, p) for name, p, runs in parsers(parser) if runs)


def test_every_command_but_the_documented_ones_takes_json() -> None:
    commands = dict(leaves(cli.build_parser()))
    assert len(commands) > 30 and "secret keygen" in commands  # the walk finds them all
    without = {name for name, p in commands.items()
               if not any("--json" in a.option_strings for a in p._actions)}
    assert without == set(cli.NO_JSON)


def test_help_lists_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code, meaning in EXIT_STATUSES:
        assert f" {code} {' '.join(meaning.split())}" in text
    for command in cli.NO_JSON:
        assert f"`{command}`" in text


def test_subcommands_exit_help_names_only_documented_codes() -> None:
    documented = {code for code, _ in EXIT_STATUSES}
    found = set()
    for name, parser, _ in parsers(cli.build_parser()):
        if not name:
            continue  # the top level's table: test_help_lists_every_exit_status
        text = " ".join(parser.format_help().split())
        for part in text.split("exit status: ")[1:]:
            codes = {int(c) for c in re.findall(r"(?:^|; )(\d+) ", part.split("(see")[0])}
            assert codes and codes <= documented, (name, part)
            found.add(name)
    assert found >= {"submit", "status", "list", "logs", "wait", "cancel", "executors", "env",
                     "incidents", "up", "replay", "image", "secret", "nats-user"}
    assert " ".join(exit_epilog((EXIT_OK, "shown")).split()) == (
        "exit status: 0 shown; 2 bad input or refused; 3 no gateway; 4 rate limited (see "
        "`vigil --help`)")


def readme_paragraph() -> str:
    text = " ".join(README.read_text(encoding="utf-8").split())
    start = text.index("Every command but")
    return text[start:text.index("interrupted.", start)]


def test_the_readme_names_the_commands_without_json_and_every_exit_status() -> None:
    paragraph = readme_paragraph()
    without = paragraph[:paragraph.index("takes `--json`")]
    assert set(re.findall(r"`([a-z][a-z -]*)`", without)) == set(cli.NO_JSON)
    statuses = paragraph[paragraph.index("Exit status"):]
    codes = [int(c) for c in re.findall(r"[:;] (\d+) ", statuses)]
    assert codes == [code for code, _ in EXIT_STATUSES]
