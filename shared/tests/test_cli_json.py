"""Unit tests: `--json` of the commands that work on local files (tokens, NATS users). The
gateway's commands print the API's JSON; tests/test_cli.py runs them against a real one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vigil import auth, cli
from vigil.cli_output import EXIT_OK, EXIT_TASK_FAILED

pytestmark = pytest.mark.unit


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    code = exit_.value.code
    assert isinstance(code, int)
    out, err = capsys.readouterr()
    return code, out, err


def one_json(out: str) -> Any:
    assert out.count("\n") == 1, out  # one document on one line, for `jq` and friends
    return json.loads(out)


def test_token_create_json_names_what_the_token_is_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens.json"
    code, out, _ = run(capsys, "token", "create", "--tenant", "acme", "--role", "viewer",
                       "--name", "ci", "--file", str(tokens), "--json")
    assert code == EXIT_OK
    made = one_json(out)
    assert {k: v for k, v in made.items() if k != "token"} == {
        "name": "ci", "tenant": "acme", "role": "viewer", "scope": "tenant"}
    found = auth.TokenBook.load(tokens).verify(made["token"])
    assert found is not None and (found.tenant, found.role) == ("acme", "viewer")
    code, out, _ = run(capsys, "token", "create", "--platform", "--role", "operator",
                       "--file", str(tokens))
    assert code == EXIT_OK and out.startswith("vgl") and "{" not in out  # the token alone


def test_nats_user_json_add_list_remove(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    users = str(tmp_path / "users.json")
    code, out, _ = run(capsys, "nats-user", "add", "--tenant", "acme", "--file", users,
                       "--server", "nats.example:4222", "--json")
    assert code == EXIT_OK
    added = one_json(out)
    assert (added["name"], added["tenant"]) == ("tenant-acme", "acme")
    assert added["url"].startswith("nats://tenant-acme:") and \
        added["url"].endswith("@nats.example:4222")
    assert added["inbox_prefix"].endswith("acme")

    code, out, _ = run(capsys, "nats-user", "list", "--file", users, "--json")
    assert code == EXIT_OK
    listed = one_json(out)
    assert listed == {"users": [{"name": "tenant-acme", "tenant": "acme"}]}
    assert "password" not in out

    code, out, _ = run(capsys, "nats-user", "remove", "tenant-acme", "--file", users, "--json")
    assert (code, one_json(out)) == (EXIT_OK, {"name": "tenant-acme", "tenant": "acme"})
    code, out, err = run(capsys, "nats-user", "remove", "tenant-acme", "--file", users)
    assert code == EXIT_TASK_FAILED and out == "" and "no NATS user 'tenant-acme'" in err
