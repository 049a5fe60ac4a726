"""Secrets by reference (issue #11): sealed at rest, managed by a tenant's operators,
resolved by the executor, masked in everything that comes back.

Unit tests cover the crypto (round trip, tenant/name binding, tampering, rotation), the
masker (encodings, multi-line values, a value split across output chunks, a line cut at
the limit) and log redaction. Integration tests run the real gateway API and the `vigil`
command against a nats-server with the shipped permissions (tenants' NATS users cannot
read the bucket), and the end-to-end proof runs every service as a real process with a
real rootless Podman agent: the secret reaches the agent as env and file, its value is
nowhere in VIGIL_SUBMIT, VIGIL_EVENTS, VIGIL_ISSUES, vigil-tasks, the incidents or the
services' logs, vigil-secrets holds it only as ciphertext, and `vigil logs` shows ***.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator
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
