"""The `vigil` command as a user runs it (a subprocess of .venv/bin/vigil) against a real
gateway, scheduler and executor on a real nats-server: submit from a YAML file, list
with filters and pages, follow logs, wait, cancel, and the exit codes scripts rely on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import CliResult, Platform, eventually, run_vigil
from vigil import auth
from vigil.client import Client

pytestmark = pytest.mark.integration

SLEEPER = ["python3", "-c", "import time\nprint('working', flush=True)\ntime.sleep(60)"]


@dataclass
class Cli:
    url: str
    token: str
    home: Path

    async def __call__(self, *argv: str, timeout: float = 60.0, **env: str) -> CliResult:
        """Run ``vigil ARGV`` with the gateway and token from the environment, in a home
        of its own (no stray config file or client.json is read)."""
        return await run_vigil(self.home, self.url, self.token, *argv, timeout=timeout, **env)


@pytest.fixture
async def cli(platform: Platform, tmp_path: Path) -> Cli:
    tokens = tmp_path / "tokens.json"
    token = auth.add_token(tokens, "cli", "acme", "submitter")
    await platform.scheduler()
    await platform.executor(stop_grace_s=2.0)
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens))
    home = tmp_path / "home"
    home.mkdir()
    return Cli(f"http://127.0.0.1:{gw.http_port}", token, home)


async def test_submit_yaml_wait_list_filters_and_pages(cli: Cli, platform: Platform) -> None:
    task = cli.home / "task.yaml"
    task.write_text("""\
# a task file, as a user writes one
command: [sh, -c, 'echo "hello $WHO"']
env:
  WHO: yaml
labels:
  batch: b1
  kind: hello
""")
    sub = await cli("submit", "-f", str(task), "--label", "kind=greeting", "--json")
    assert sub.code == 0, sub.err
    first = sub.json()["id"]
    waited = await cli("wait", first, "--timeout", "30")
    assert waited.code == 0, waited.err
    assert f"task {first} succeeded" in waited.out
    logs = await cli("logs", first)
    assert (logs.code, logs.out) == (0, "hello yaml\n")
    status = await cli("status", first)
    assert "batch=b1,kind=greeting" in status.out  # the flag overrode the file's label

    # More tasks through the SDK: four fail, three succeed, in two batches.
    async with Client(cli.url, cli.token) as client:
        ids = [first]
        for i in range(7):
            accepted = await client.submit({
                "id": f"cli-list-{i}", "command": ["false"] if i < 4 else ["true"],
                "max_attempts": 1, "labels": {"batch": "b2" if i % 2 else "b1"}})
            ids.append(accepted["id"])
        for task_id in ids:
            await client.wait(task_id, timeout_s=30)

        async def indexed() -> bool:
            page = await client.list_tasks(limit=500)
            return len(page.tasks) == 8 and all(t.status in ("succeeded", "failed")
                                                for t in page.tasks)

        await eventually(indexed, what="the gateway's index to show 8 finished tasks")

    table = await cli("list")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "ATTEMPT", "EXECUTOR", "AGE", "EXIT", "LABELS"]
    assert [line.split()[0] for line in lines[1:]] == list(reversed(ids))  # newest first
    assert "\033[" not in table.out  # no colour when not a terminal

    failed = await cli("list", "--status", "failed", "--label", "batch=b1", "--json")
    assert failed.code == 0, failed.err
    got = failed.json()
    assert {t["id"] for t in got["tasks"]} == {"cli-list-0", "cli-list-2"}
    assert got["next_cursor"] is None
    assert {t["exit_code"] for t in got["tasks"]} == {1}

    # Paging: two at a time by hand, then --all following the cursors itself.
    one = (await cli("list", "--limit", "2", "--json")).json()
    assert len(one["tasks"]) == 2 and one["next_cursor"]
    two = (await cli("list", "--limit", "2", "--cursor", one["next_cursor"], "--json")).json()
    assert [t["id"] for t in one["tasks"] + two["tasks"]] == list(reversed(ids))[:4]
    everything = await cli("list", "--all", "--limit", "3", "--json")
    assert [t["id"] for t in everything.json()["tasks"]] == list(reversed(ids))
    short = await cli("list", "--limit", "3")
    assert len(short.out.splitlines()) == 4 and "--cursor" in short.err

    recent = await cli("list", "--since", "1h", "--status", "succeeded,failed", "--json")
    assert len(recent.json()["tasks"]) == 8
    none = await cli("list", "--until", "1h")
    assert (none.code, none.out) == (0, "") and "no tasks match" in none.err

    bad = await cli("list", "--status", "done")
    assert bad.code == 2 and "'done' is not a status" in bad.err


async def test_logs_follow_exit_codes_and_streams(cli: Cli) -> None:
    script = ("import sys, time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n"
              "    print(f'err {i}', file=sys.stderr, flush=True)\n    time.sleep(0.1)\n"
              "sys.exit(int(sys.argv[1]))")
    async with Client(cli.url, cli.token) as client:
        ok = (await client.submit({"command": ["python3", "-c", script, "0"]}))["id"]
        bad = (await client.submit({"command": ["python3", "-c", script, "3"],
                                    "max_attempts": 1}))["id"]
    followed = await cli("logs", "-f", ok, "--stream", "stdout")
    assert followed.code == 0, followed.err
    assert followed.out.splitlines() == [f"line {i}" for i in range(4)]
    assert followed.err == ""  # no status line when stderr is not a terminal
    errors = await cli("logs", "-f", bad, "--stream", "stderr")
    assert errors.code == 1
    assert errors.out.splitlines() == [f"err {i}" for i in range(4)]
    both = await cli("logs", bad)  # without -f the exit code says only that it printed
    assert both.code == 0 and len(both.out.splitlines()) == 8

    missing = await cli("logs", "-f", "no-such-task")
    assert missing.code == 1 and "no task 'no-such-task'" in missing.err


async def test_cancel_and_wait_exit_codes(cli: Cli, platform: Platform) -> None:
    async with Client(cli.url, cli.token) as client:
        running = (await client.submit({"id": "cli-sleeper", "command": SLEEPER}))["id"]
        done = (await client.submit({"id": "cli-done", "command": ["true"]}))["id"]
        failing = (await client.submit({"id": "cli-fails", "command": ["false"],
                                        "max_attempts": 1}))["id"]
        await client.wait(done, timeout_s=30)
        await client.wait(failing, timeout_s=30)
    await platform.events.wait_for(running, "log")

    timed_out = await cli("wait", running, "--timeout", "0.5", "--json")
    assert timed_out.code == 124, timed_out.err
    assert "did not finish within 0.5s (still running)" in timed_out.err
    assert timed_out.json()["status"] == "running"

    cancelled = await cli("cancel", running, "--reason", "from the cli", "--wait",
                          "--timeout", "30")
    assert cancelled.code == 0, cancelled.out + cancelled.err
    assert f"task {running} cancelled" in cancelled.out
    state = await platform.final_state(running)
    assert state.status == "cancelled" and "from the cli" in (state.cancel_reason or "")
    again = await cli("cancel", running, "--json")
    assert again.code == 0 and again.json()["status"] == "cancelled"

    finished = await cli("cancel", done)
    assert finished.code == 1 and "already succeeded; nothing to cancel" in finished.err

    assert (await cli("wait", done)).code == 0
    failed = await cli("wait", failing, "--json")
    assert failed.code == 1 and failed.json()["status"] == "failed"
    missing = await cli("wait", "no-such-task")
    assert missing.code == 1 and "no task" in missing.err
    nowhere = await cli("wait", done, VIGIL_GATEWAY_URL="http://127.0.0.1:9")
    assert nowhere.code == 3 and "cannot reach the gateway" in nowhere.err
    unauthorised = await cli("list", VIGIL_TOKEN="vgl_wrong")
    assert unauthorised.code == 2 and "VIGIL_TOKEN" in unauthorised.err


async def test_submit_errors_name_the_file_and_the_field(cli: Cli) -> None:
    listed = cli.home / "list.yaml"
    listed.write_text("- echo\n- hi\n")
    result = await cli("submit", "-f", str(listed))
    assert result.code == 2
    assert f"task file {listed} must hold a mapping" in result.err
    typo = cli.home / "typo.json"
    typo.write_text(json.dumps({"command": ["true"], "timeout": 5}))
    result = await cli("submit", "-f", str(typo))
    assert result.code == 2 and "timeout" in result.err and str(typo) in result.err


async def test_config_file_supplies_gateway_and_token(cli: Cli) -> None:
    config = cli.home / ".config" / "vigil" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'gateway_url = "{cli.url}"\ntoken = "{cli.token}"\n')
    config.chmod(0o644)
    result = await cli("list", VIGIL_GATEWAY_URL="", VIGIL_TOKEN="")
    assert result.code == 0, result.err
    assert f"chmod 600 {config}" in result.err  # it holds a token and others may read it
    shown = await cli("config", "show", "--json", VIGIL_GATEWAY_URL="", VIGIL_TOKEN="")
    assert shown.json()["gateway_url_from"] == str(config)
    assert cli.token not in shown.out


async def test_executors_lists_the_fleet_by_pool(cli: Cli, platform: Platform) -> None:
    await platform.executor(node_id="cli-gpu-1", pool="gpu", labels="gpu=a100,zone=eu",
                            slots=2, advertise_s=0.2)
    seen = await cli("executors")
    assert seen.code == 0, seen.err
    lines = seen.out.splitlines()
    assert lines[0].split() == ["NODE", "POOL", "SLOTS", "RUNNING", "FREE", "STATE",
                                "RUNTIME", "SEEN", "LABELS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert len(rows) == 2  # the fixture's executor and this one, by pool then node
    assert rows["cli-gpu-1"][1:6] == ["gpu", "2", "0", "2", "ready"]
    assert rows["cli-gpu-1"][-1] == "gpu=a100,zone=eu"
    assert lines[-1].split()[0] == "cli-gpu-1"  # "default" < "gpu"
    assert "2 executors in 2 pools" in seen.err

    async with Client(cli.url, cli.token) as client:
        task = (await client.submit({"command": SLEEPER, "pool": "gpu"}))["id"]
        await platform.events.wait_for(task, "log")

        async def busy() -> dict[str, Any] | None:
            got = await cli("executors", "--pool", "gpu", "--json")
            assert got.code == 0, got.err
            found = got.json()["executors"]
            return found[0] if len(found) == 1 and found[0]["running"] == 1 else None

        gpu = await eventually(busy, what="the gpu executor to advertise its running task")
        assert (gpu["node"], gpu["slots"], gpu["free"], gpu["draining"]) == (
            "cli-gpu-1", 2, 1, False)
        assert gpu["labels"] == {"gpu": "a100", "zone": "eu"}
        assert gpu["tenants"] == {"acme": 1}  # the token's own tenant only
        await client.cancel(task)
        await client.wait(task, timeout_s=30)

    none = await cli("executors", "--pool", "nowhere")
    assert (none.code, none.out) == (0, "") and "no executors in pool nowhere" in none.err
    unauthorised = await cli("executors", VIGIL_TOKEN="vgl_wrong")
    assert unauthorised.code == 2 and "VIGIL_TOKEN" in unauthorised.err
