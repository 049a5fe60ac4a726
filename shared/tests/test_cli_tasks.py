"""Unit tests: the task commands' parsing, task files, tables and help texts."""

from __future__ import annotations

import argparse
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vigil import cli, cli_tasks
from vigil.api import TaskSummary
from vigil.cli_output import StatusLine, age, table
from vigil.errors import VigilError

pytestmark = pytest.mark.unit

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ANSI = re.compile(r"\033\[[0-9;]*m")


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


# task files ---------------------------------------------------------------------------------
def test_yaml_task_file_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("""\
command: [python3, agent.py, 3]
image: localhost/agent:1
env:
  STEPS: 3
  MODE: fast
labels: {team: ml, run: 1}
secrets: {API_KEY: llm-key, DB: 42}
timeout_s: 600
""")
    args = parse("submit", "-f", str(path), "--env", "MODE=slow", "--label", "run=2",
                 "--timeout", "60", "--secret", "DB=db-password")
    spec = cli_tasks.spec_from_args(args)
    assert spec == {
        "command": ["python3", "agent.py", "3"],  # YAML's integers become text again
        "image": "localhost/agent:1",
        "env": {"STEPS": "3", "MODE": "slow"},
        "labels": {"team": "ml", "run": "2"},
        "secrets": {"API_KEY": "llm-key", "DB": "db-password"},  # names, not values
        "timeout_s": 60.0,
    }
    # A command after -- replaces the file's.
    args = parse("submit", "-f", str(path), "--", "echo", "hi")
    assert cli_tasks.spec_from_args(args)["command"] == ["echo", "hi"]


def test_egress_secrets_and_environment_flags_add_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("""\
command: [python3, agent.py]
egress: {allow: [api.example.com]}
secrets: {API_KEY: llm-key}
""")
    args = parse("submit", "-f", str(path), "--egress", "*.pypi.org:443", "--egress",
                 "api.example.com", "--secret", "GH_TOKEN=gh", "--environment", "repo-a")
    spec = cli_tasks.spec_from_args(args)
    assert spec["egress"] == {"allow": ["api.example.com", "*.pypi.org:443"]}
    assert spec["secrets"] == {"API_KEY": "llm-key", "GH_TOKEN": "gh"}
    assert spec["environment"] == "repo-a"
    with pytest.raises(VigilError, match="--secret takes KEY=VALUE"):
        cli_tasks.spec_from_args(parse("submit", "--secret", "GH_TOKEN", "--", "true"))


def test_json_task_file(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"command": ["true"], "max_attempts": 2}))
    assert cli_tasks.load_task_file(str(path)) == {"command": ["true"], "max_attempts": 2}
    # Any other suffix is read as YAML, which JSON is (nearly) a subset of.
    other = tmp_path / "task.spec"
    other.write_text(json.dumps({"command": ["true"]}))
    assert cli_tasks.load_task_file(str(other)) == {"command": ["true"]}


def test_task_file_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("command: [echo, from-stdin]\n"))
    assert cli_tasks.load_task_file("-") == {"command": ["echo", "from-stdin"]}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("list.yaml", "- echo\n- hi\n", "must hold a mapping of task fields.*holds a list"),
        ("empty.yaml", "", "holds nothing"),
        ("scalar.yaml", "echo hi\n", "holds a str"),
        ("bad.yaml", "command: [echo\n", "not valid YAML"),
        ("bad.json", '{"command": ', "not valid JSON"),
        ("bool.yaml", "command: [echo]\nenv: {FLAG: yes}\n", r"env\.FLAG is True.*quotes"),
        ("float.yaml", "command: [sleep, 1.5]\n", r"command\[1\] is 1\.5"),
    ],
)
def test_bad_task_files_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(VigilError, match=message) as err:
        cli_tasks.load_task_file(str(path))
    assert str(path) in str(err.value)


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(VigilError, match=r"cannot read task file .*nope\.yaml"):
        cli_tasks.load_task_file(str(tmp_path / "nope.yaml"))


def test_no_command_says_how_to_give_one(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("image: x\n")
    with pytest.raises(VigilError, match=r"no command.*after `--`"):
        cli_tasks.spec_from_args(parse("submit", "-f", str(path)))


# filters ------------------------------------------------------------------------------------
def test_statuses_repeat_comma_and_aliases() -> None:
    assert cli_tasks.statuses(["failed,dead", "running", "failed"]) == [
        "failed", "dead", "running"]
    assert cli_tasks.statuses(["active"]) == ["queued", "scheduled", "running"]
    assert set(cli_tasks.statuses(["finished"])) == {
        "succeeded", "failed", "cancelled", "timed_out", "dead"}
    with pytest.raises(VigilError, match="'done' is not a status; use one of queued"):
        cli_tasks.statuses(["done"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2w", NOW - timedelta(weeks=2)),
        ("2026-04-30T08:00:00Z", datetime(2026, 4, 30, 8, tzinfo=UTC)),
        ("2026-04-30T10:00:00+02:00", datetime(2026, 4, 30, 8, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert cli_tasks.parse_time(text, "--since", NOW) == expected


def test_parse_time_local_and_bad() -> None:
    local = cli_tasks.parse_time("2026-04-30", "--since", NOW)
    assert local.tzinfo is not None and abs(local - datetime(2026, 4, 30, tzinfo=UTC)) <= \
        timedelta(hours=14)
    with pytest.raises(VigilError, match="--until takes a duration ago such as 30m"):
        cli_tasks.parse_time("yesterday", "--until", NOW)
    with pytest.raises(VigilError):
        cli_tasks.parse_time("5x", "--since", NOW)


def test_label_pairs() -> None:
    assert cli_tasks.pairs(["a=1", "b=x=y", "c="], "--label") == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(VigilError, match="--label takes KEY=VALUE, not 'oops'"):
        cli_tasks.pairs(["oops"], "--label")


# output -------------------------------------------------------------------------------------
def summary(task_id: str, status: str, **kw: object) -> TaskSummary:
    fields: dict[str, object] = {"tenant": "acme", "created_at": NOW - timedelta(minutes=5),
                                 "updated_at": NOW, **kw}
    return TaskSummary(id=task_id, status=status, **fields)


def test_list_table() -> None:
    tasks = [
        summary("t_new", "running", attempt=2, executor="node-b", labels={"team": "ml"}),
        summary("t_older_one", "failed", attempt=3, executor="node-a", exit_code=4,
                created_at=NOW - timedelta(hours=3)),
        summary("t_q", "queued"),
    ]
    lines = cli_tasks.render_tasks(tasks, now=NOW)
    assert lines == [
        "ID           STATUS   ATTEMPT  EXECUTOR  AGE  EXIT  LABELS",
        "t_new        running        2  node-b     5m     -  team=ml",
        "t_older_one  failed         3  node-a     3h     4",
        "t_q          queued         0  -          5m     -",
    ]


def test_coloured_table_stays_aligned() -> None:
    tasks = [summary("a", "succeeded", exit_code=0), summary("bb", "dead")]
    plain = cli_tasks.render_tasks(tasks, now=NOW)
    coloured = cli_tasks.render_tasks(tasks, color=True, now=NOW)
    assert coloured != plain
    assert "\033[32msucceeded" in coloured[1] and "\033[1;31mdead" in coloured[2]
    assert [ANSI.sub("", line) for line in coloured] == plain


def test_last_column_is_cut_to_the_terminal() -> None:
    lines = table(("A", "B"), [("x", "y" * 50)], width=20)
    assert lines[1] == "x  " + "y" * 16 + "…" and len(lines[1]) == 20


def test_age() -> None:
    assert [age(NOW - timedelta(seconds=s), NOW) for s in (0, 59, 60, 3_599, 3_600, 90_000,
                                                           700_000)] == [
        "0s", "59s", "1m", "59m", "1h", "1d", "1w"]
    assert age(NOW + timedelta(seconds=5), NOW) == "0s"  # a clock a little ahead


def test_status_line_only_on_a_terminal() -> None:
    err = io.StringIO()
    line = StatusLine(err)
    line.set("task x running")
    line.print_line("hello", out=io.StringIO())
    assert err.getvalue() == ""
    shown = StatusLine(err, enabled=True)
    out = io.StringIO()
    shown.set("task x running")
    shown.print_line("hello", out=out)
    assert out.getvalue() == "hello\n"
    assert err.getvalue().count("task x running") == 2 and "\r\033[K" in err.getvalue()


# help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["submit", "status", "list", "logs", "wait", "cancel",
                                     "config", "incidents", "up"])
def test_each_command_has_help_with_examples(command: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: vigil {command}" in text
    assert "example" in text


def test_top_level_help_lists_commands_exit_codes_and_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for word in ("submit", "list", "logs", "wait", "cancel", "replay", "config",
                 "exit status:", "124", "VIGIL_GATEWAY_URL", "config.toml"):
        assert word in text


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2
    assert "usage: vigil" in capsys.readouterr().out


def test_scheduling_flags_make_the_spec() -> None:
    args = cli.build_parser().parse_args([
        "submit", "--priority", "9", "--not-before", "10m", "--queue-timeout", "60",
        "--node-label", "gpu=a100", "--no-retry-on", "2", "--no-retry-on", "3", "--", "true"])
    before = datetime.now(UTC)
    spec = cli_tasks.spec_from_args(args)
    assert spec["priority"] == 9 and spec["queue_timeout_s"] == 60.0
    assert spec["node_labels"] == {"gpu": "a100"}
    assert spec["retry"] == {"non_retryable_exit_codes": [2, 3]}
    start = datetime.fromisoformat(spec["not_before"])
    assert timedelta(minutes=9) < start - before < timedelta(minutes=11)  # from now, not ago
    args = cli.build_parser().parse_args(
        ["submit", "--not-before", "2030-01-01T00:00:00Z", "--", "true"])
    assert cli_tasks.spec_from_args(args)["not_before"] == "2030-01-01T00:00:00+00:00"


def test_follow_prints_egress_connections() -> None:
    from vigil.cli_output import Printer
    from vigil.client import StreamEvent

    out = io.StringIO()
    printer = Printer(out)
    printer.event(StreamEvent(1, "egress", {
        "host": "api.example.com", "port": 443, "allowed": True, "address": "93.184.216.34",
        "bytes_out": 812, "bytes_in": 4096, "duration_s": 0.42}))
    printer.event(StreamEvent(2, "egress", {
        "host": "evil.example", "port": 443, "allowed": False,
        "reason": "evil.example:443: not on the task's egress list"}))
    assert out.getvalue().splitlines() == [
        "  ⇄ egress api.example.com:443 (93.184.216.34): 812 bytes out, 4096 in, 0.4s",
        "  ⇄ egress refused evil.example:443: evil.example:443: not on the task's egress list",
    ]
