"""Unit tests: where the CLI finds its gateway URL and token, and `vigil config show`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from vigil import cli, cli_config
from vigil.errors import VigilError

pytestmark = pytest.mark.unit

LOCAL = "http://127.0.0.1:8080"
PROD = "https://vigil.example.com"


def args(**flags: object) -> argparse.Namespace:
    return argparse.Namespace(**flags)


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment with an empty XDG config home and a data dir with client.json."""
    (tmp_path / "xdg").mkdir()
    data = tmp_path / "stack"
    data.mkdir()
    (data / "client.json").write_text(json.dumps({"url": LOCAL, "token": "vgl_local_token_1"}))
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "VIGIL_DATA_DIR": str(data),
            "HOME": str(tmp_path)}


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_client_json_is_the_last_resort(home: dict[str, str]) -> None:
    config = cli_config.resolve(args(), home)
    assert (config.url, config.token) == (LOCAL, "vgl_local_token_1")
    assert config.url_origin.endswith("client.json")
    assert config.config_file_state == "not found"


def test_precedence_flags_env_file_client_json(home: dict[str, str], tmp_path: Path) -> None:
    write_config(tmp_path / "xdg" / "vigil" / "config.toml",
                 f'gateway_url = "{PROD}"\ntoken = "vgl_file_token_22"\n')
    config = cli_config.resolve(args(), home)
    assert (config.url, config.token) == (PROD, "vgl_file_token_22")
    assert config.config_file_state == "read"

    env = {**home, "VIGIL_GATEWAY_URL": PROD + "/", "VIGIL_TOKEN": "vgl_env_token_333"}
    config = cli_config.resolve(args(), env)
    assert (config.url, config.token) == (PROD + "/", "vgl_env_token_333")
    assert (config.url_origin, config.token_origin) == ("VIGIL_GATEWAY_URL", "VIGIL_TOKEN")

    config = cli_config.resolve(args(gateway="http://flag:1", token="vgl_flag_4444"), env)
    assert (config.url, config.token) == ("http://flag:1", "vgl_flag_4444")
    assert (config.url_origin, config.token_origin) == ("--gateway", "--token")


def test_a_token_is_not_sent_to_another_gateway(home: dict[str, str]) -> None:
    # The URL from the environment, no token there: client.json's token belongs to the
    # local stack, not to this gateway.
    config = cli_config.resolve(args(), {**home, "VIGIL_GATEWAY_URL": PROD})
    assert config.url == PROD and config.token is None
    # ...unless it is that gateway (a trailing slash does not matter).
    config = cli_config.resolve(args(), {**home, "VIGIL_GATEWAY_URL": LOCAL + "/"})
    assert config.token == "vgl_local_token_1"
    # A token given alone (flag or env) goes with whichever URL wins.
    config = cli_config.resolve(args(token="vgl_flag_4444"), {**home, "VIGIL_GATEWAY_URL": PROD})
    assert (config.url, config.token) == (PROD, "vgl_flag_4444")


def test_config_file_from_flag_and_env(home: dict[str, str], tmp_path: Path) -> None:
    a = write_config(tmp_path / "a.toml", f'gateway_url = "{PROD}"\n')
    b = write_config(tmp_path / "b.toml", 'gateway_url = "http://b:2"\n')
    env = {**home, "VIGIL_CLIENT_CONFIG": str(a)}
    assert cli_config.resolve(args(), env).url == PROD
    assert cli_config.resolve(args(config=str(b)), env).url == "http://b:2"


def test_named_config_file_must_exist(home: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(VigilError, match=r"nope\.toml.*--config.*does not exist"):
        cli_config.resolve(args(config=str(tmp_path / "nope.toml")), home)
    with pytest.raises(VigilError, match="VIGIL_CLIENT_CONFIG"):
        cli_config.resolve(args(), {**home, "VIGIL_CLIENT_CONFIG": str(tmp_path / "no.toml")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gateway_url = ", "not valid TOML"),
        ('gateway = "http://x"', "unknown key 'gateway'; the keys are gateway_url, token"),
        ("token = 42", "token must be a string"),
    ],
)
def test_bad_config_files_are_named(home: dict[str, str], tmp_path: Path, text: str,
                                    message: str) -> None:
    path = write_config(tmp_path / "c.toml", text)
    with pytest.raises(VigilError) as err:
        cli_config.resolve(args(config=str(path)), home)
    assert str(path) in str(err.value) and message in str(err.value)


def test_readable_token_file_warns(home: dict[str, str], tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", 'token = "vgl_file_token_22"\n', mode=0o644)
    config = cli_config.resolve(args(config=str(path)), home)
    assert len(config.warnings) == 1 and f"chmod 600 {path}" in config.warnings[0]
    path.chmod(0o600)
    assert cli_config.resolve(args(config=str(path)), home).warnings == []
    # No token in it, nothing to protect.
    path = write_config(tmp_path / "d.toml", f'gateway_url = "{PROD}"\n', mode=0o644)
    assert cli_config.resolve(args(config=str(path)), home).warnings == []


def test_no_gateway_says_how_to_get_one(tmp_path: Path) -> None:
    config = cli_config.resolve(args(data_dir=str(tmp_path)), {"HOME": str(tmp_path)})
    with pytest.raises(VigilError, match=r"vigil up.*--gateway.*VIGIL_GATEWAY_URL"):
        config.require_url()


def test_mask_hides_the_token() -> None:
    token = "vgl_" + "x" * 20 + "secret"
    masked = cli_config.mask(token)
    assert "secret" not in masked and masked.startswith("vgl_xxxx")
    assert cli_config.mask("short") == "****"


def test_flags_work_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--gateway", "http://a:1", "list"])
    after = parser.parse_args(["list", "--gateway", "http://b:2"])
    neither = parser.parse_args(["list"])
    assert before.gateway == "http://a:1" and after.gateway == "http://b:2"
    assert neither.gateway is None


def test_config_show_masks_and_names_sources(
        home: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for key in list(os.environ):
        if key.startswith("VIGIL_"):
            monkeypatch.delenv(key)
    for key, value in home.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VIGIL_TOKEN", "vgl_env_token_secret_333")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["config", "show"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "secret" not in out
    assert LOCAL in out and "client.json" in out and "(VIGIL_TOKEN)" in out
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["gateway_url"] == LOCAL and shown["token_from"] == "VIGIL_TOKEN"
    assert "secret" not in shown["token"]
