"""Tenants' secrets at rest: sealed with AES-256-GCM under a key the operator provides.

A secret is stored in the ``vigil-secrets`` bucket under ``<tenant>.<name>`` (the key
convention of ``vigil-tasks``) as a :class:`SealedSecret`: the id of the key that sealed
it, a fresh 96-bit nonce, the ciphertext (with GCM's tag) and metadata. The associated
data is ``tenant + "\\0" + name``: a ciphertext copied under another tenant's (or name's)
key does not decrypt. NATS only ever holds ciphertext; the key never reaches it.

Keys come from the operator, never from NATS: ``VIGIL_SECRETS_KEY_FILE`` (a file) and/or
``VIGIL_SECRETS_KEY`` (the same text, or the lines separated by commas, for container
platforms that inject secrets as environment), one key per line::

    # id:base64 of 32 random bytes (`vigil secret keygen` prints one)
    k2:9Jp0...=
    k1:Qm1h...=

The first key is the current one: it seals. Every key decrypts what it sealed. Rotation:
put a new key on the first line (keep the old ones below it), restart the gateway and the
executors, run ``vigil secret rotate`` (it re-seals every secret of every tenant with the
current key), then drop the old line and restart them again. With both settings given,
the file's keys come first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import secrets as random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from vigil import subjects
from vigil.errors import SettingsError, VigilError
from vigil.jetstream import kv_read, kv_write, retrying
from vigil.messages import ID_PATTERN, utcnow

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's 96-bit nonce, random per seal (2**32 seals per key stay safe)
MAX_VALUE_BYTES = 64 * 1024
"""The largest secret value (UTF-8 bytes). Sealed and base64-encoded it stays well inside
the bucket's 128 KiB value limit, and it fits one environment variable of a process."""
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KEY_ID_RE = re.compile(KEY_ID_PATTERN)
NAME_RE = re.compile(ID_PATTERN)
SETTINGS_HINT = ("set VIGIL_SECRETS_KEY_FILE (a file of `id:base64-key` lines; `vigil secret "
                 "keygen` prints one) or VIGIL_SECRETS_KEY (the same text) on the gateway and "
                 "the executors")


class SecretError(VigilError):
    """A secret cannot be sealed, opened or stored; the message says which and why (and
    never holds a value)."""


class KeyMissing(SecretError):
    """The secret was sealed with a key this process does not have (a rotation under
    way: another node, or this one restarted, may have it)."""

    retryable = True

    def __init__(self, key_id: str, known: Iterable[str]) -> None:
        super().__init__(f"it was sealed with key {key_id!r}, which this service does not "
                         f"have (it has {', '.join(sorted(known)) or 'none'}); give it every "
                         "key that sealed a secret (see `vigil secret rotate --help`)")
        self.key_id = key_id


class SealedSecret(msgspec.Struct, frozen=True, kw_only=True):
    """The value of ``<tenant>.<name>`` in ``vigil-secrets``. ``size`` is the plaintext's
    length in bytes; ``ciphertext`` includes GCM's 16-byte tag (bytes are base64 in JSON)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes
    size: int
    created_at: datetime
    updated_at: datetime
    v: int = 1  # the envelope's format


_sealed_decoder = msgspec.json.Decoder(SealedSecret)
_encoder = msgspec.json.Encoder()


def associated_data(tenant: str, name: str) -> bytes:
    """What a secret's ciphertext is bound to: its tenant and its name."""
    return f"{tenant}\0{name}".encode()


def key_name(tenant: str, name: str) -> str:
    """The secret's key in ``vigil-secrets``: ``<tenant>.<name>`` (as in vigil-tasks)."""
    return f"{tenant}.{name}"


@dataclass(frozen=True)
class Keyring:
    """The operator's keys, current (sealing) key first. Holds key material: never log
    it, never put it in a message."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SettingsError(f"no secrets key given; {SETTINGS_HINT}")

    def __repr__(self) -> str:  # the dataclass's would print the keys
        return f"Keyring(current={self.current_id!r}, keys={len(self.keys)})"

    @property
    def current_id(self) -> str:
        return self.keys[0][0]

    @property
    def ids(self) -> list[str]:
        return [key_id for key_id, _ in self.keys]

    @classmethod
    def parse(cls, text: str, where: str) -> Keyring:
        """Keys from ``id:base64`` lines (blank lines and ``#`` comments skipped); errors
        name ``where`` and the line, never the key."""
        keys: list[tuple[str, bytes]] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key_id, sep, encoded = line.partition(":")
            key_id = key_id.strip()
            if not sep or not KEY_ID_RE.fullmatch(key_id):
                raise SettingsError(
                    f"{where}, line {n}: expected `id:base64-key` with an id of letters, "
                    "digits, `_`, `.` or `-` (at most 64)")
            try:
                material = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise SettingsError(f"{where}, line {n} (key {key_id!r}): the key is not "
                                    "valid base64") from None
            if len(material) != KEY_BYTES:
                raise SettingsError(f"{where}, line {n} (key {key_id!r}): a key must be "
                                    f"{KEY_BYTES} bytes (AES-256), this one is "
                                    f"{len(material)}; `vigil secret keygen` makes one")
            if any(key_id == known for known, _ in keys):
                raise SettingsError(f"{where}, line {n}: key id {key_id!r} appears twice")
            keys.append((key_id, material))
        if not keys:
            raise SettingsError(f"{where} holds no key; {SETTINGS_HINT}")
        return cls(tuple(keys))

    @classmethod
    def load(cls, key_file: str = "", key: str = "") -> Keyring | None:
        """The keyring of the settings ``VIGIL_SECRETS_KEY_FILE`` and ``VIGIL_SECRETS_KEY``
        (the file's keys first); None when neither is set."""
        if not key_file and not key:
            return None
        keys: list[tuple[str, bytes]] = []
        if key_file:
            try:
                text = Path(key_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise SettingsError(f"VIGIL_SECRETS_KEY_FILE: cannot read {key_file}: "
                                    f"{reason}") from None
            keys += cls.parse(text, f"VIGIL_SECRETS_KEY_FILE {key_file}").keys
        if key:
            # Commas separate keys too: an env file cannot hold a newline.
            for key_id, material in cls.parse(key.replace(",", "\n"),
                                               "VIGIL_SECRETS_KEY").keys:
                same = [m for k, m in keys if k == key_id]
                if same and same[0] != material:
                    raise SettingsError(f"key id {key_id!r} names two different keys in "
                                        "VIGIL_SECRETS_KEY_FILE and VIGIL_SECRETS_KEY")
                if not same:
                    keys.append((key_id, material))
        return cls(tuple(keys))

    def seal(self, tenant: str, name: str, value: str, *,
             created_at: datetime | None = None, now: datetime | None = None) -> SealedSecret:
        """``value`` encrypted with the current key, bound to ``tenant`` and ``name``."""
        plain = value.encode()
        if len(plain) > MAX_VALUE_BYTES:
            raise SecretError(f"the value is {len(plain)} bytes; at most {MAX_VALUE_BYTES}")
        key_id, material = self.keys[0]
        nonce = os.urandom(NONCE_BYTES)
        now = now or utcnow()
        return SealedSecret(
            key_id=key_id, nonce=nonce,
            ciphertext=AESGCM(material).encrypt(nonce, plain, associated_data(tenant, name)),
            size=len(plain), created_at=created_at or now, updated_at=now)

    def open(self, tenant: str, name: str, sealed: SealedSecret) -> str:
        """The value of ``sealed``, stored as ``tenant``'s secret ``name``. Raises
        :class:`KeyMissing` (not this keyring's key) or :class:`SecretError` (it does not
        authenticate: altered, or moved from another tenant's or name's key)."""
        material = dict(self.keys).get(sealed.key_id)
        if material is None:
            raise KeyMissing(sealed.key_id, self.ids)
        try:
            plain = AESGCM(material).decrypt(sealed.nonce, sealed.ciphertext,
                                             associated_data(tenant, name))
        except (InvalidTag, ValueError):
            raise SecretError(
                f"secret {name!r} of tenant {tenant!r} does not decrypt with key "
                f"{sealed.key_id!r}: it was altered, or copied from another tenant or name; "
                f"set it again (`vigil secret set {name}`)") from None
        return plain.decode("utf-8", errors="replace")

    def reseal(self, tenant: str, name: str, sealed: SealedSecret) -> SealedSecret:
        """``sealed`` sealed again with the current key (its times kept: the value is the
        same; ``updated_at`` says when it was last set)."""
        resealed = self.seal(tenant, name, self.open(tenant, name, sealed),
                             created_at=sealed.created_at)
        return msgspec.structs.replace(resealed, updated_at=sealed.updated_at)


def new_key_line(key_id: str) -> str:
    """A fresh key as a key-file line: ``id:base64`` of 32 random bytes."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise SettingsError(f"key id {key_id!r}: letters, digits, `_`, `.` or `-` (at most "
                            "64, starting with a letter or digit)")
    return f"{key_id}:{base64.b64encode(random.token_bytes(KEY_BYTES)).decode()}"


def write_key_file(path: Path, key_id: str = "k1") -> None:
    """Create ``path`` (0600) holding one fresh key; an existing file is left alone."""
    text = ("# Vigil's secrets key (see `vigil secret rotate --help`): the first line seals,\n"
            "# every line decrypts. Losing it loses every secret.\n"
            f"{new_key_line(key_id)}\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def decode_sealed(data: bytes, key: str) -> SealedSecret:
    try:
        return _sealed_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SecretError(f"{subjects.KV_SECRETS} {key} is not a sealed secret ({exc}); "
                          "delete it and set the secret again") from None


@dataclass(frozen=True)
class Stored:
    """One secret as the bucket holds it, with its revision (for compare-and-set)."""

    tenant: str
    name: str
    sealed: SealedSecret
    revision: int


class SecretStore:
    """Typed access to ``vigil-secrets``. Values go in and out sealed: the store itself
    never sees a plaintext."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        # Built, not looked up (no stream info round trip); reads go to the stream's
        # leader, so a write is seen by the next read.
        self._kv = KeyValue(name=subjects.KV_SECRETS, stream=f"KV_{subjects.KV_SECRETS}",
                            pre=f"$KV.{subjects.KV_SECRETS}.", js=js, direct=False)

    async def get(self, tenant: str, name: str) -> Stored | None:
        key = key_name(tenant, name)

        read = await kv_read(self._kv, key, f"read secret {key}")
        return None if read is None else Stored(tenant, name, decode_sealed(read[0], key),
                                                read[1])

    async def put(self, tenant: str, name: str, sealed: SealedSecret,
                  revision: int | None) -> int | None:
        """Create the secret (``revision`` None) or replace the one at ``revision``; the
        new revision, or None when someone else wrote it first."""
        key = key_name(tenant, name)
        return await kv_write(self._kv, key, _encoder.encode(sealed), revision,
                              f"write secret {key}")

    async def delete(self, tenant: str, name: str) -> None:
        """Remove the secret: the delete marker replaces its only stored copy."""
        key = key_name(tenant, name)
        await retrying(f"delete secret {key}", lambda: self._kv.delete(key))

    async def all(self, tenant: str | None = None) -> list[Stored]:
        """Every secret of ``tenant`` (None: of every tenant), by tenant then name. The
        keys come from the stream's per-subject counts (one request, no consumer), then
        one read each; a key deleted in between is left out."""
        prefix = f"$KV.{subjects.KV_SECRETS}."
        info = await retrying("list secrets", lambda: self._js.stream_info(
            f"KV_{subjects.KV_SECRETS}", subjects_filter=f"{prefix}{tenant or '*'}.*"))
        names = [key.split(".") for key in
                 (s.removeprefix(prefix) for s in (info.state.subjects or {}))]
        found = await asyncio.gather(*(self.get(t, n) for t, n in
                                       (parts for parts in names if len(parts) == 2)))
        return sorted((s for s in found if s is not None), key=lambda s: (s.tenant, s.name))


@dataclass
class Rotation:
    """What :func:`rotate` found and did."""

    total: int = 0
    current: int = 0  # sealed with the current key already
    resealed: int = 0  # (or, in a dry run, would be)
    failed: list[str] = field(default_factory=list)  # "<tenant>.<name>: why"


async def rotate(store: SecretStore, keyring: Keyring, *, dry_run: bool,
                 on_progress: Callable[[Rotation], None] = lambda _: None) -> Rotation:
    """Re-seal every secret of every tenant that is not sealed with the current key.

    Each write is a compare-and-set on the revision read: a secret set meanwhile (sealed
    with the current key by then, if the gateway has it) is read again, never overwritten
    with an older value. Running it again re-seals nothing more. A secret that cannot be
    opened (a key this keyring lacks, an altered value) is left as it is and reported."""
    done = Rotation()
    found = await store.all()
    done.total = len(found)
    for stored in found:
        where = key_name(stored.tenant, stored.name)
        for _ in range(5):
            if stored.sealed.key_id == keyring.current_id:
                done.current += 1
                break
            try:
                sealed = keyring.reseal(stored.tenant, stored.name, stored.sealed)
            except SecretError as exc:
                done.failed.append(f"{where}: {exc}")
                break
            if dry_run or await store.put(stored.tenant, stored.name, sealed,
                                          stored.revision) is not None:
                done.resealed += 1
                break
            again = await store.get(stored.tenant, stored.name)
            if again is None:  # removed meanwhile: nothing to re-seal
                done.total -= 1
                break
            stored = again
        else:
            done.failed.append(f"{where}: it kept changing while being re-sealed; run again")
        on_progress(done)
    return done
