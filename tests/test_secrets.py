"""Secrets by reference (issue #11): sealed at rest, managed by a tenant's operators,
resolved by the executor, masked in everything that comes back.

Unit tests cover the crypto (round trip, tenant/name binding, tampering, rotation), the
masker (encodings, multi-line values, a value split across output chunks, a line cut at
the limit) and log redaction. Integration tests run the real gateway API and the `vigil`
command against a nats-server with the shipped permissions (tenants' NATS users cannot
read the bucket), and the end-to-end proof runs every service as a real process with a
real rootless Podman agent: the secret reaches the agent as env and file, its value is
nowhere in VIGIL_SUBMIT, VIGIL_EVENTS, VIGIL_OUTPUT, VIGIL_ISSUES, vigil-tasks, the incidents or the
services' logs, vigil-secrets holds it only as ciphertext, and `vigil logs` shows ***.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import pytest

from support import (
    AuditorProcess,
    ExecutorProcess,
    GatewayProcess,
    Platform,
    SchedulerProcess,
    allow_violations,
    as_user,
    eventually,
    run_vigil,
    session_node_id,
    stored_events,
)
from vigil import auth, logs, subjects
from vigil.errors import SettingsError
from vigil.jetstream import read_stored
from vigil.messages import Log, Progress, TaskState
from vigil.natsserver import NatsServer
from vigil.secrets import (
    KeyMissing,
    Keyring,
    SealedSecret,
    SecretError,
    SecretStore,
    decode_sealed,
    new_key_line,
)
from vigil_executor.agentio import AgentOutput
from vigil_executor.runtime import LineSplitter
from vigil_executor.secrets import Masker, SecretFiles, filesystem_of

VALUE = "sk-ant-Zx9!quote\"slash\\end"  # JSON escapes it: the escaped form is masked too
KEY1, KEY2 = new_key_line("k1"), new_key_line("k2")


# crypto ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_sealed_secret_opens_only_as_its_tenant_and_name() -> None:
    ring = Keyring.parse(KEY1, "test")
    sealed = ring.seal("acme", "llm-key", VALUE)
    assert sealed.key_id == "k1" and sealed.size == len(VALUE.encode())
    assert VALUE.encode() not in msgspec.json.encode(sealed)
    assert ring.open("acme", "llm-key", sealed) == VALUE
    for tenant, name in (("beta", "llm-key"), ("acme", "other-key")):
        with pytest.raises(SecretError, match="does not decrypt"):
            ring.open(tenant, name, sealed)
    # A fresh nonce each time: the same value never seals to the same bytes.
    assert ring.seal("acme", "llm-key", VALUE).ciphertext != sealed.ciphertext


@pytest.mark.unit
def test_a_tampered_ciphertext_or_nonce_does_not_open() -> None:
    ring = Keyring.parse(KEY1, "test")
    sealed = ring.seal("acme", "k", VALUE)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    for bad in (msgspec.structs.replace(sealed, ciphertext=flipped),
                msgspec.structs.replace(sealed, nonce=bytes(12))):
        with pytest.raises(SecretError, match="altered"):
            ring.open("acme", "k", bad)


@pytest.mark.unit
def test_rotation_keeps_old_secrets_opening_and_reseals_with_the_new_key() -> None:
    old = Keyring.parse(KEY1, "test")
    sealed = old.seal("acme", "k", VALUE)
    both = Keyring.parse(f"# rotation\n{KEY2}\n\n{KEY1}\n", "test")
    assert both.current_id == "k2" and both.open("acme", "k", sealed) == VALUE
    resealed = both.reseal("acme", "k", sealed)
    assert resealed.key_id == "k2" and resealed.created_at == sealed.created_at
    new_only = Keyring.parse(KEY2, "test")
    assert new_only.open("acme", "k", resealed) == VALUE
    with pytest.raises(KeyMissing, match="'k1'"):
        new_only.open("acme", "k", sealed)


@pytest.mark.unit
def test_key_errors_name_the_setting_and_line_never_the_key(tmp_path: Path) -> None:
    material = KEY1.split(":", 1)[1]
    short = base64.b64encode(b"x" * 16).decode()
    for text, expect in ((f"k1:{short}", "must be 32 bytes"),
                         ("k1:not base64!", "not valid base64"),
                         (f"{KEY1}\n{KEY1}", "appears twice"),
                         (f"bad id:{material}", "expected `id:base64-key`"),
                         ("# nothing\n", "holds no key")):
        with pytest.raises(SettingsError, match=expect) as info:
            Keyring.parse(text, "VIGIL_SECRETS_KEY")
        assert material not in str(info.value) and short not in str(info.value)
    assert Keyring.load() is None
    key_file = tmp_path / "keys"
    key_file.write_text(KEY2 + "\n")
    ring = Keyring.load(str(key_file), f"{KEY1},{KEY2}")  # commas: an env file's lines
    assert ring is not None and ring.ids == ["k2", "k1"]
    assert material not in repr(ring)
    with pytest.raises(SettingsError, match="cannot read"):
        Keyring.load(str(tmp_path / "missing"))


# masking -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_masker_hides_a_value_its_lines_and_encodings() -> None:
    pem = "-----BEGIN KEY-----\nAAAAsecretline\n-----END KEY-----"
    m = Masker([VALUE, pem, "abc"])
    assert m.mask(f"token={VALUE}!") == "token=***!"
    assert m.mask(json.dumps({"t": VALUE})) == '{"t": "***"}'
    encoded = base64.b64encode(VALUE.encode()).decode()
    assert m.mask(f"b64 {encoded}").startswith("b64 ***")
    assert m.mask("line: AAAAsecretline") == "line: ***"  # a multi-line value, line by line
    assert m.mask("abc is too short to mask") == "abc is too short to mask"
    assert m.mask_any({"k": [VALUE, 1], VALUE: None}) == {"k": ["***", 1], "***": None}
    assert not Masker([]) and not Masker(["ab"]) and m


@pytest.mark.unit
async def test_agent_output_masks_lines_split_across_chunks_and_control_payloads() -> None:
    emitted: list[Any] = []
    confessed: list[Any] = []
    notes: list[Any] = []

    async def confess(c: Any) -> None:
        confessed.append(c)

    async def checkpoint(payload: Any) -> None:
        notes.append(payload)

    async def malformed(e: Any) -> None:
        confessed.append(e)

    out = AgentOutput("t", 1, emitted.append, on_confess=confess, on_checkpoint=checkpoint,
                      on_malformed=malformed, masker=Masker([VALUE]))
    splitter = LineSplitter(max_len=120)
    # The value arrives in two chunks (two writes of the agent): the splitter joins the
    # line, the masker sees it whole.
    lines = splitter.feed(f"my key is {VALUE[:6]}".encode())
    lines += splitter.feed(f"{VALUE[6:]} ok\n".encode())
    escaped = json.dumps(VALUE)
    lines += splitter.feed(
        f'::vigil::progress {{"key": {escaped}, "u": "\\u0073{json.dumps(VALUE[1:])[1:-1]}"}}\n'
        f'::vigil::confess {{"summary": "leaked {escaped[1:-1]}", "severity": "error"}}\n'
        f'::vigil::checkpoint {{"note": {{"k": {escaped}}}}}\n'
        f"::vigil::{VALUE}\n".encode())
    # A line cut at the limit right inside the value: the start of the value goes too.
    lines += splitter.feed(("x" * 116 + VALUE + "\n").encode())
    lines += splitter.feed(f"partial {VALUE}".encode())  # no newline: flushed at the end
    lines += splitter.flush()
    for line in lines:
        await out.feed("stdout", line)
    out.flush()
    logged = [line for e in emitted if isinstance(e, Log) for line in e.lines]
    progress = [e.data for e in emitted if isinstance(e, Progress)]
    text = json.dumps([logged, progress, [str(c) for c in confessed], notes, list(out.tail)])
    assert VALUE not in text and VALUE[:6] not in text and escaped[1:-1] not in text
    assert logged[0] == "my key is *** ok" and "partial ***" in logged
    assert logged[-2].startswith("x" * 116 + "***")
    assert progress == [{"key": "***", "u": "***"}]
    assert confessed[0].summary == "leaked ***" and notes == [{"note": {"k": "***"}}]


@pytest.mark.unit
def test_log_lines_are_redacted_in_the_context_that_holds_secrets() -> None:
    event = {"event": "task_handed_back", "reason": f"init said {VALUE}", "n": 3,
             "extra": [VALUE, {"x": VALUE}], "exc_info": None}

    def inside() -> Any:
        logs.redact(Masker([VALUE]).mask)
        return logs._redacted(None, "info", dict(event))

    masked = contextvars.copy_context().run(inside)
    assert masked["reason"] == "init said ***" and masked["extra"] == ["***", {"x": "***"}]
    assert masked["n"] == 3
    assert logs._redacted(None, "info", dict(event)) == event  # other contexts: untouched


@pytest.mark.unit
def test_secret_files_live_on_tmpfs_readable_only_through_a_private_parent(
        tmp_path: Path) -> None:
    if filesystem_of(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    root = Path("/dev/shm") / f"vigil-secrets-unit-{os.getpid()}"
    files = SecretFiles(root, os.geteuid())
    try:
        files.prepare()
        leftover = files.write("acme.t-a1", {"A": "x"})
        files.prepare()  # a restarted executor clears an earlier life's files
        assert not leftover.exists()
        d = files.write("acme.t-a2", {"API_TOKEN": VALUE})
        assert (d / "API_TOKEN").read_text() == VALUE
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o555
        assert stat.S_IMODE(os.stat(d / "API_TOKEN").st_mode) == 0o444
    finally:
        from vigil_executor.secrets import _remove

        _remove(root)
    if filesystem_of(tmp_path) not in ("tmpfs", "ramfs"):
        with pytest.raises(SettingsError, match="not tmpfs"):
            SecretFiles(tmp_path / "secrets", os.geteuid()).prepare()


# the API -----------------------------------------------------------------------------------
@dataclass
class Api:
    url: str
    tokens: dict[str, str]
    key_file: Path
    home: Path

    async def call(self, method: str, path: str, who: str | None,
                   body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        async with aiohttp.ClientSession() as http, http.request(
                method, self.url + path, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=30)) as r:
            raw = await r.read()
            return r.status, json.loads(raw) if raw else None


@pytest.fixture
async def api(platform: Platform, tmp_path: Path) -> Api:
    tokens_file = tmp_path / "tokens.json"
    tokens = {f"{t}-{r}": auth.add_token(tokens_file, f"{t}-{r}", t, r)
              for t in ("acme", "beta") for r in auth.ROLES}
    tokens["platform"] = auth.add_token(tokens_file, "platform", None, "operator", "platform")
    key_file = tmp_path / "secrets.key"
    key_file.write_text(KEY1 + "\n")
    await platform.scheduler()
    gw = await platform.gateway(auth="tokens", tokens_file=str(tokens_file),
                                secrets_key_file=str(key_file))
    home = tmp_path / "home"
    home.mkdir()
    return Api(f"http://127.0.0.1:{gw.http_port}", tokens, key_file, home)


@pytest.mark.integration
async def test_the_api_is_write_only_operator_only_and_walls_tenants_apart(
        api: Api, platform: Platform) -> None:
    answers: list[Any] = []
    for role in ("viewer", "submitter"):
        for method, path, body in (("PUT", "/v1/secrets/llm-key", {"value": VALUE}),
                                   ("GET", "/v1/secrets", None),
                                   ("GET", "/v1/secrets/llm-key", None),
                                   ("DELETE", "/v1/secrets/llm-key", None)):
            status, answer = await api.call(method, path, f"acme-{role}", body)
            assert status == 403 and answer["error"]["code"] == "forbidden", (role, path)
    status, answer = await api.call("GET", "/v1/secrets", "platform")
    assert status == 403 and "platform token" in answer["error"]["message"]
    assert (await api.call("GET", "/v1/secrets", None))[0] == 401

    status, created = await api.call("PUT", "/v1/secrets/llm-key", "acme-operator",
                                     {"value": VALUE})
    assert status == 201, created
    assert set(created) == {"name", "size", "key_id", "created_at", "updated_at"}
    assert created["size"] == len(VALUE.encode()) and created["key_id"] == "k1"
    status, replaced = await api.call("PUT", "/v1/secrets/llm-key", "acme-operator",
                                      {"value": VALUE + "2"})
    assert status == 200 and replaced["created_at"] == created["created_at"]
    answers += [created, replaced]
    for path in ("/v1/secrets", "/v1/secrets/llm-key"):
        status, answer = await api.call("GET", path, "acme-operator")
        assert status == 200
        answers.append(answer)
    assert answers[-2]["secrets"][0]["name"] == "llm-key"
    # Another tenant, whatever its role: its own (empty) list, and a 404 like a missing one.
    status, theirs = await api.call("GET", "/v1/secrets", "beta-operator")
    assert status == 200 and theirs == {"secrets": []}
    for method in ("GET", "DELETE"):
        status, answer = await api.call(method, "/v1/secrets/llm-key", "beta-operator")
        missing = await api.call(method, "/v1/secrets/no-such-key", "beta-operator")
        assert status == missing[0] == 404 and answer["error"]["code"] == "not_found"
    # beta's own secret of the same name is another secret.
    assert (await api.call("PUT", "/v1/secrets/llm-key", "beta-operator",
                           {"value": "beta-value"}))[0] == 201
    assert VALUE not in json.dumps(answers)

    # Bad input: a precise 4xx naming the field; the value never in the message.
    for body, field in (({"value": ""}, "$.value"), ({"value": f"{VALUE}\u0000"}, "$.value"),
                        ({"value": VALUE, "extra": 1}, "$.extra"), ({}, "$.value"),
                        ({"value": "é" * 40_000}, "$.value")):
        status, answer = await api.call("PUT", "/v1/secrets/llm-key", "acme-operator", body)
        assert status == 422 and answer["error"]["field"] == field, (body, answer)
        assert VALUE not in json.dumps(answer)
    status, answer = await api.call("PUT", "/v1/secrets/llm-key", "acme-operator", b"{oops")
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    status, answer = await api.call("PUT", "/v1/secrets/bad.name", "acme-operator",
                                    {"value": "x"})
    assert status in (400, 404)  # (aiohttp may route a dotted name; never a 2xx)

    # A task naming a secret its tenant lacks: 422 naming $.secrets.ENV_NAME, at once.
    spec = {"command": ["true"], "secrets": {"API_TOKEN": "no-such-key"}}
    status, answer = await api.call("POST", "/v1/tasks", "acme-submitter", spec)
    assert status == 422 and answer["error"]["field"] == "$.secrets.API_TOKEN"
    assert "vigil secret set no-such-key" in answer["error"]["message"]
    status, _ = await api.call("POST", "/v1/tasks", "beta-submitter",
                               {"command": ["true"], "secrets": {"T": "llm-key"}})
    assert status == 202  # beta has its own llm-key

    # vigil-secrets holds ciphertext only, bound to its tenant and name.
    kv = await platform.js.key_value(subjects.KV_SECRETS)
    raw = (await kv.get("acme.llm-key")).value
    assert raw is not None and VALUE.encode() not in raw
    sealed = decode_sealed(raw, "acme.llm-key")
    assert Keyring.load(str(api.key_file)).open("acme", "llm-key", sealed) == VALUE + "2"  # type: ignore[union-attr]

    assert (await api.call("DELETE", "/v1/secrets/llm-key", "acme-operator"))[0] == 204
    assert (await api.call("GET", "/v1/secrets/llm-key", "acme-operator"))[0] == 404
    assert (await api.call("GET", "/v1/secrets", "acme-operator"))[1] == {"secrets": []}


@pytest.mark.integration
async def test_a_gateway_without_a_key_refuses_to_set_and_says_what_to_set(
        platform: Platform, tmp_path: Path) -> None:
    gw = await platform.gateway()
    url = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{url}/v1/secrets/k", json={"value": VALUE}) as r:
            answer = await r.json()
            assert r.status == 503 and answer["error"]["code"] == "secrets_not_configured"
            assert "VIGIL_SECRETS_KEY_FILE" in answer["error"]["message"]
        async with http.get(f"{url}/v1/secrets") as r:
            assert r.status == 200 and await r.json() == {"secrets": []}


@pytest.mark.integration
async def test_a_tenants_nats_user_cannot_read_the_secrets_bucket(
        nats_server: NatsServer, platform: Platform) -> None:
    ring = Keyring.parse(KEY1, "test")
    store = SecretStore(platform.js)
    assert await store.put("acme", "llm-key", ring.seal("acme", "llm-key", VALUE), None)
    allow_violations(nats_server, "tenant-acme")  # what it tries is the test
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(as_user(nats_server.url, "tenant-acme"), error_cb=on_error,
                            inbox_prefix=subjects.tenant_inbox("acme").encode())
    try:
        stream = f"KV_{subjects.KV_SECRETS}"
        for subject, body in (
                (f"$JS.API.DIRECT.GET.{stream}.$KV.{subjects.KV_SECRETS}.acme.llm-key", b""),
                (f"$JS.API.DIRECT.GET.{stream}", b'{"seq":1}'),
                (f"$JS.API.STREAM.MSG.GET.{stream}",
                 json.dumps({"last_by_subj": f"$KV.{subjects.KV_SECRETS}.acme.llm-key"})
                 .encode()),
                (f"$JS.API.CONSUMER.CREATE.{stream}", b"{}"),
                (f"$JS.API.STREAM.INFO.{stream}", b"")):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(subject, body, timeout=1)

            async def refused(needle: str = subject.lower()) -> bool:
                return any(needle in e for e in errors)

            await eventually(refused, timeout=5, what=f"the server to refuse {subject}")
        # Nor can it write one (a value it made up, sealed or not).
        await nc.publish(f"$KV.{subjects.KV_SECRETS}.acme.llm-key", b"{}")

        async def write_refused() -> bool:
            return any(f"$kv.{subjects.KV_SECRETS}" in e for e in errors)

        await eventually(write_refused, timeout=5, what="the server to refuse the write")
    finally:
        await nc.close()
    found = await store.get("acme", "llm-key")
    assert found is not None and ring.open("acme", "llm-key", found.sealed) == VALUE


@pytest.mark.integration
async def test_the_cli_sets_lists_removes_and_rotates(api: Api, nats_server: NatsServer
                                                        ) -> None:
    vigil = run_vigil
    token = api.tokens["acme-operator"]
    value_file = api.home / "value.txt"
    value_file.write_text(VALUE)
    done = await vigil(api.home, api.url, token, "secret", "set", "llm-key",
                       "--from-file", str(value_file))
    assert done.code == 0, done.err
    assert "llm-key set" in done.out and VALUE not in done.out + done.err
    empty = await vigil(api.home, api.url, token, "secret", "set", "other")  # stdin: empty
    assert empty.code == 2 and "empty" in empty.err
    bad = await vigil(api.home, api.url, token, "secret", "set", "no/slash",
                      "--from-file", str(value_file))
    assert bad.code == 2 and "not a secret name" in bad.err
    listed = await vigil(api.home, api.url, token, "secret", "list")
    assert listed.code == 0 and "llm-key" in listed.out and "k1" in listed.out
    as_json = await vigil(api.home, api.url, token, "secret", "list", "--json")
    assert as_json.json()["secrets"][0]["size"] == len(VALUE.encode())
    viewer = await vigil(api.home, api.url, api.tokens["acme-viewer"], "secret", "list")
    assert viewer.code == 2 and "operator role" in viewer.err

    # Rotation: k2 first, k1 kept; `rotate` (a dry run, then --yes) re-seals with k2.
    api.key_file.write_text(f"{KEY2}\n{KEY1}\n")
    operator = as_user(nats_server.url, "operator")
    dry = await vigil(api.home, api.url, token, "secret", "rotate", "--key-file",
                      str(api.key_file), "--nats-url", operator)
    assert dry.code == 0 and "1 would re-seal with key k2" in dry.out, dry.err
    done = await vigil(api.home, api.url, token, "secret", "rotate", "--yes",
                       "--nats-url", operator, VIGIL_SECRETS_KEY_FILE=str(api.key_file))
    assert done.code == 0 and "1 re-sealed with key k2" in done.out, done.err
    again = await vigil(api.home, api.url, token, "secret", "rotate", "--yes",
                        "--nats-url", operator, VIGIL_SECRETS_KEY=KEY2)
    assert again.code == 0 and "0 re-sealed" in again.out and "1 sealed with it" in again.out
    listed = await vigil(api.home, api.url, token, "secret", "list", "--json")
    assert listed.json()["secrets"][0]["key_id"] == "k2"
    # A keyring without the key that sealed a secret names it, and fails.
    lost = await vigil(api.home, api.url, token, "secret", "rotate", "--yes",
                       "--nats-url", operator, VIGIL_SECRETS_KEY=new_key_line("k3"))
    assert lost.code == 1 and "acme.llm-key" in lost.err and "'k2'" in lost.err

    removed = await vigil(api.home, api.url, token, "secret", "rm", "llm-key")
    assert removed.code == 0
    gone = await vigil(api.home, api.url, token, "secret", "rm", "llm-key")
    assert gone.code == 1 and "no secret 'llm-key'" in gone.err


# the executor ------------------------------------------------------------------------------
CHECKS = """\
import hashlib, json, os, stat, sys
value = os.environ["API_TOKEN"]
path = os.path.join(os.environ["VIGIL_SECRETS_DIR"], "API_TOKEN")
with open(path) as fh:
    from_file = fh.read()
try:
    open(path, "w")
    writable = True
except OSError:
    writable = False
checks = {
    "env": hashlib.sha256(value.encode()).hexdigest() == sys.argv[1],
    "file": from_file == value,
    "mode": stat.S_IMODE(os.stat(path).st_mode) == 0o444,
    # (the unsafe process runtime's agent is this test's root: no sandbox stops it)
    "read_only": not writable or sys.argv[2] == "-",
    "dir": sys.argv[2] in ("-", os.environ["VIGIL_SECRETS_DIR"]),
    "plain_env": os.environ.get("OTHER") == "plain",
}
if not all(checks.values()):
    print("checks failed:", checks, flush=True)
    sys.exit(3)
print("checks ok", flush=True)
sys.stdout.write("the token is " + value[:5])
sys.stdout.flush()
sys.stdout.write(value[5:] + " (split across two writes)\\n")
sys.stdout.flush()
print("::vigil::progress " + json.dumps({"token": value}), flush=True)
print("::vigil::confess " + json.dumps({"summary": "I leaked " + value,
                                        "severity": "warning"}), flush=True)
print(json.dumps({"escaped": value}), file=sys.stderr, flush=True)
print(value, flush=True)
sys.exit(7)
"""


def task_spec(task_id: str, secret: str, mount: str) -> dict[str, Any]:
    digest = hashlib.sha256(VALUE.encode()).hexdigest()
    return {"id": task_id, "command": ["python3", "-c", CHECKS, digest, mount],
            "env": {"OTHER": "plain"}, "secrets": {"API_TOKEN": secret}, "max_attempts": 1}


def leaks(data: bytes) -> list[str]:
    """Which forms of VALUE ``data`` holds (raw, as JSON escapes it, base64)."""
    forms = {"raw": VALUE.encode(), "json": json.dumps(VALUE)[1:-1].encode(),
             "base64": base64.b64encode(VALUE.encode()).rstrip(b"=")}
    return [name for name, form in forms.items() if form in data]


@pytest.mark.integration
async def test_the_executor_fails_a_task_whose_secret_is_missing_or_unopenable(
        platform: Platform, tmp_path: Path) -> None:
    key_file = tmp_path / "secrets.key"
    key_file.write_text(KEY1 + "\n")
    await platform.scheduler()
    ex = await platform.executor(secrets_key_file=str(key_file))
    await platform.executor(pool="keyless")
    store = SecretStore(platform.js)
    await store.put("acme", "llm-key", Keyring.parse(KEY1, "t").seal("acme", "llm-key", VALUE),
                    None)
    # Through raw NATS (no gateway to check first): the executor finds out.
    await platform.publish_spec({**task_spec("needs-missing", "no-such-key", "-"),
                                 "max_attempts": 3})
    await platform.publish_spec({**task_spec("keyless", "llm-key", "-"), "pool": "keyless"})
    missing = await platform.final_state("needs-missing")
    assert missing.status == "failed" and missing.attempt == 1  # not retried
    assert "'no-such-key' (for $API_TOKEN) does not exist in tenant acme" in (missing.error or "")
    assert "vigil secret set no-such-key" in (missing.error or "")
    keyless = await platform.final_state("keyless")
    assert keyless.status == "failed" and "no key to open secrets" in (keyless.error or "")
    categories = {c.get("category") for c in await platform.confessions()}
    assert {"secret_missing", "secrets_not_configured"} <= categories

    # Sealed with a key this executor lacks (a rotation under way): handed back, no attempt.
    await store.put("acme", "rotated", Keyring.parse(KEY2, "t").seal("acme", "rotated", VALUE),
                    None)
    await platform.publish_spec(task_spec("rotating", "rotated", "-"))

    async def handed_back() -> TaskState | None:
        s = await platform.state("rotating")
        return s if s is not None and any(h.outcome == "handed_back" for h in s.history) \
            else None

    state = await eventually(handed_back, timeout=30, what="the task to be handed back")
    assert "'k2'" in (state.history[0].error or "") and state.attempt <= 1
    await eventually(lambda: _has(platform, "secret_key_missing"), timeout=15,
                     what="the secret_key_missing confession")
    # The process runtime's agent sees the files at VIGIL_SECRETS_DIR (a host path).
    await platform.publish_spec(task_spec("via-process", "llm-key", "-"))
    done = await platform.final_state("via-process")
    assert done.exit_code == 7, done.tail
    assert "***" in done.tail and '{"escaped": "***"}' in done.tail
    assert not leaks(msgspec.json.encode(done))
    assert ex.secrets.files is not None
    await eventually(lambda: _empty(ex.secrets.files.root), timeout=10,
                     what="the attempts' secret files to be removed")


def _secrets_root(node: str) -> Path:
    """Where the executor of ``node`` keeps its attempts' secret files (the default)."""
    (root,) = [p for p in (Path("/dev/shm") / f"vigil-secrets-{node}",
                           *Path("/run/user").glob(f"*/vigil-secrets-{node}")) if p.is_dir()]
    return root


async def _has(platform: Platform, category: str) -> bool:
    return any(c.get("category") == category for c in await platform.confessions())


async def _empty(root: Path) -> bool:
    return await asyncio.to_thread(lambda: root.is_dir() and not any(root.iterdir()))


@pytest.mark.podman
@pytest.mark.e2e
@pytest.mark.slow
async def test_a_secret_reaches_a_podman_agent_and_its_value_is_nowhere_else(
        nats_server: NatsServer, platform: Platform, podman: Any, agent_image: str,
        tmp_path: Path) -> None:
    key_file = tmp_path / "secrets.key"
    key_file.write_text(KEY1 + "\n")
    tokens_file = tmp_path / "tokens.json"
    token = auth.add_token(tokens_file, "e2e", "acme", "operator")
    node = session_node_id()
    common = {"log_level": "debug", "secrets_key_file": str(key_file)}
    procs = [SchedulerProcess(tmp_path, nats_server.url, "sched", log_level="debug"),
             AuditorProcess(tmp_path, nats_server.url, "aud", log_level="debug"),
             ExecutorProcess(tmp_path, nats_server.url, node, runtime="podman",
                             podman_url=podman.url, heartbeat_s=1, ack_wait_s=10, **common),
             GatewayProcess(tmp_path, nats_server.url, "gw", auth="tokens",
                            tokens_file=str(tokens_file), **common)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            await proc.ready()
        gateway = procs[-1]
        assert isinstance(gateway, GatewayProcess)
        home = tmp_path / "home"
        home.mkdir()
        value_file = home / "value"
        value_file.write_text(VALUE)
        done = await run_vigil(home, gateway.url, token, "secret", "set", "llm-key",
                               "--from-file", str(value_file))
        assert done.code == 0, done.err
        task = home / "task.json"
        task.write_text(json.dumps(task_spec("leaky-agent", "llm-key", "/run/secrets")))
        done = await run_vigil(home, gateway.url, token, "submit", "-f", str(task), "--wait",
                               "--timeout", "120", timeout=180)
        state = await platform.final_state("leaky-agent", tenant="acme")
        # 7, not 3: the agent found the value in $API_TOKEN and /run/secrets/API_TOKEN
        # (read-only, 0444) and printed it every way it could.
        assert state.exit_code == 7, (state.error, state.tail, done.err)
        logs_out = await run_vigil(home, gateway.url, token, "logs", "leaky-agent")
        assert logs_out.code == 0, logs_out.err
        assert "the token is *** (split across two writes)" in logs_out.out
        assert '{"escaped": "***"}' in logs_out.out and not leaks(logs_out.out.encode())
        assert "***" in state.tail and "***" in (state.error or "")

        # Every stored message and value, and every service's log: no form of the value.
        js = platform.js
        found: dict[str, list[str]] = {}
        for stream, subject in ((subjects.STREAM_SUBMIT, f"{subjects.SUBMIT}.>"),
                                (subjects.STREAM_EVENTS, f"{subjects.EVENTS}.>"),
                                (subjects.STREAM_OUTPUT, f"{subjects.EVENTS}.>"),
                                (subjects.STREAM_ISSUES, f"{subjects.ISSUES}.>"),
                                (f"KV_{subjects.KV_TASKS}", f"$KV.{subjects.KV_TASKS}.>"),
                                (f"KV_{subjects.KV_CONFESSIONS}",
                                 f"$KV.{subjects.KV_CONFESSIONS}.>"),
                                (f"KV_{subjects.KV_INCIDENTS}",
                                 f"$KV.{subjects.KV_INCIDENTS}.>")):
            messages = await read_stored(js, stream, subject, idle_s=0.5)
            if stream in (subjects.STREAM_SUBMIT, subjects.STREAM_EVENTS,
                          subjects.STREAM_OUTPUT, f"KV_{subjects.KV_TASKS}"):
                assert messages, f"nothing read from {stream}: the check could not fail"
            for data in messages:
                if leaks(data):
                    found.setdefault(stream, []).append(data.decode(errors="replace")[:300])
        for proc in procs:
            text = proc.log_path.read_bytes()
            assert b'"level"' in text  # JSON lines were written
            if leaks(text):
                found[proc.log_path.name] = [line for line in text.decode().splitlines()
                                             if leaks(line.encode())][:5]
        assert not found, found
        kinds = [e["kind"] for e in await stored_events(js, "leaky-agent", "acme")]
        assert "progress" in kinds and "confession" in kinds  # masked, not dropped

        # vigil-secrets: ciphertext only.
        sealed = await read_stored(js, f"KV_{subjects.KV_SECRETS}",
                                   f"$KV.{subjects.KV_SECRETS}.>")
        assert sealed and not any(leaks(data) for data in sealed)
        assert msgspec.json.decode(sealed[-1], type=SealedSecret).key_id == "k1"

        # The attempt's files are gone; their parent is private to Podman's user.
        root = _secrets_root(node)
        st = os.stat(root)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.stat(podman.url.removeprefix("unix://")).st_uid
        await eventually(lambda: _empty(root), timeout=15,
                         what="the attempt's secret files to be removed")
        # A clean stop takes the node's (empty) directory with it.
        executor = procs[2]
        executor.signal(signal.SIGTERM)
        assert await executor.exited() == 0
        assert not await asyncio.to_thread(root.exists)
    finally:
        for proc in procs:
            proc.kill()
