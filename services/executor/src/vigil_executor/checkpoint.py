"""Workspace checkpoints in the JetStream object store ``vigil-checkpoints``.

A checkpoint is the workspace as a tar archive (the runtime exports it), spooled to a
temporary file while its size and SHA-256 are counted, then uploaded in chunks. The
object is named ``<tenant>/<task>/a<attempt>-<n>``; the task's state points to it (written
with compare-and-set, so a stale attempt cannot replace a newer checkpoint) at the head of a
short history, and an object is deleted once it falls off that history. Which snapshot may
head it, and when a task rolls back, is :mod:`vigil_executor.checkpoint_rules`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO

import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMeta
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from vigil import subjects
from vigil.errors import NatsUnavailable, VigilError
from vigil.jetstream import retrying
from vigil_executor.runtime import ArchiveTooLarge

log = structlog.get_logger("vigil.executor.checkpoint")

SPOOL_IN_MEMORY = 8 * 1024 * 1024  # smaller archives never touch the disk
# Restoring into a new attempt's container: tries, the first backoff (doubling), and the
# hand-back delay when every try failed (the task is not started from an empty workspace).
RESTORE_TRIES = 3
RESTORE_BACKOFF_S = 0.5
RESTORE_HAND_BACK_S = 5.0
# Deliveries that may fail to restore one checkpoint (each after RESTORE_TRIES tries)
# before the task is dead instead of handed back again (ADR 8).
RESTORE_DELIVERIES = 3
CHUNK_WAIT_S = 10.0  # the longest a download waits for its next chunk


class CheckpointError(VigilError):
    pass


class CheckpointTooLarge(CheckpointError):
    pass


@dataclass(frozen=True)
class Saved:
    name: str
    size: int
    digest: str
    uploaded: bool = True  # False: the archive was the ``unless`` one, and not stored


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


def object_name(tenant: str, task_id: str, attempt: int, n: int) -> str:
    return f"{tenant}/{task_id}/a{attempt}-{n}"


class CheckpointStore:
    """Workspace archives in an object store: the tasks' checkpoints, or (``bucket``
    vigil-env-snapshots) the persistent environments' snapshots, under one size limit."""

    def __init__(self, js: JetStreamContext, max_bytes: int,
                 bucket: str = subjects.OBJ_CHECKPOINTS, what: str = "checkpoint") -> None:
        self._js = js
        self._max = max_bytes
        self._bucket = bucket
        self._what = what
        self._store: ObjectStore | None = None

    async def open(self) -> None:
        self._store = await self._js.object_store(self._bucket)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            raise CheckpointError(f"{self._what} store is not open")
        return self._store

    async def save(self, name: str, archive: AsyncIterator[bytes], description: str, *,
                   unless: str | None = None) -> Saved:
        """Spool ``archive``, enforce the size limit, upload; return what was stored.
        Not uploaded when its digest is ``unless`` (the snapshot it would repeat).

        The limit bites as bytes arrive: the first chunk past it ends the checkpoint (the
        Podman runtime, given the same limit, stops its own download once past it plus
        ``RAW_SLACK``, 64 KiB)."""
        digest = hashlib.sha256()
        size = 0
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            try:
                async for chunk in archive:
                    size += len(chunk)
                    if size > self._max:
                        raise CheckpointTooLarge(self._too_large(size))
                    digest.update(chunk)
                    await asyncio.to_thread(spool.write, chunk)
            except ArchiveTooLarge as exc:
                raise CheckpointTooLarge(self._too_large(exc.read)) from None
            found = f"sha256:{digest.hexdigest()}"
            if found == unless:
                return Saved(name=name, size=size, digest=found, uploaded=False)
            spool.seek(0)
            meta = ObjectMeta(name=name, description=description)
            store = self.store

            async def upload() -> object:
                spool.seek(0)
                return await store.put(name, spool, meta=meta)  # type: ignore[arg-type]

            await retrying(f"upload {self._what} {name}", upload, deadline_s=60)
        return Saved(name=name, size=size, digest=found)

    def _too_large(self, read: int) -> str:
        return (f"workspace archive exceeds the {self._what} limit of {mib(self._max)} "
                f"(VIGIL_CHECKPOINT_MAX_MB); stopped reading it after {read} bytes. Keep "
                "large or rebuildable files out of the workspace, or raise the limit")

    async def load(self, name: str, into: IO[bytes]) -> int:
        """Download ``name`` into ``into``, verified against the store's digest."""
        store = self.store
        try:
            info = await store.get_info(name)
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise CheckpointError(f"{self._what} {name} is not in the object store") from exc
        size, found = await read_object(self._js, self._bucket, info, into, what=name)
        recorded = (info.digest or "").partition("=")[2]
        if base64.urlsafe_b64encode(found).decode() != recorded or size != info.size:
            raise CheckpointError(f"{self._what} {name} did not download whole: {size} of "
                                  f"{info.size} bytes, or a digest that does not match")
        into.flush()
        return into.tell()

    async def delete(self, name: str) -> None:
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await self.store.delete(name)

    def delete_later(self, name: str) -> None:
        """Best effort, off the task's path: a leftover object expires with the store's TTL."""
        task = asyncio.create_task(self._delete_quietly(name))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _delete_quietly(self, name: str) -> None:
        try:
            await self.delete(name)
        except Exception as exc:  # a leftover is harmless; say so and move on
            log.info("checkpoint_delete_failed", name=name, error=str(exc))


_background: set[asyncio.Task[None]] = set()


async def read_object(js: JetStreamContext, bucket: str, info: ObjectInfo, into: IO[bytes], *,
                      what: str, on_chunk: Callable[[int], None] | None = None,
                      ) -> tuple[int, bytes]:
    """Download the object ``info`` describes into ``into``: its size and SHA-256 (raw).
    ``on_chunk`` is told the bytes read so far after every chunk.

    Not nats-py's ``ObjectStore.get``: it subscribes to the chunks without naming their
    stream, so the client asks the server which stream holds them
    (``$JS.API.STREAM.NAMES``), a call the executor's least-privilege NATS user may not
    make. Here the stream is named, and the chunks are read by an ordered consumer.
    """
    if not info.nuid:
        raise CheckpointError(f"{what} has no chunks on record (bad metadata)")
    size = 0
    found = hashlib.sha256()
    if not info.size:
        return size, found.digest()
    sub = await js.subscribe(f"$O.{bucket}.C.{info.nuid}", stream=f"OBJ_{bucket}",
                             ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=CHUNK_WAIT_S)
            except nats.errors.TimeoutError:
                raise NatsUnavailable(
                    f"{what}: no chunk arrived for {CHUNK_WAIT_S:g}s after {size} of "
                    f"{info.size} bytes") from None
            await asyncio.to_thread(into.write, msg.data)
            found.update(msg.data)
            size += len(msg.data)
            if on_chunk is not None:
                on_chunk(size)
            if msg.metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return size, found.digest()


def archive_problem(archive: IO[bytes], digest: str) -> str | None:
    """Why the downloaded checkpoint in ``archive`` can never be restored, or None: its
    bytes are not the ones the task's state recorded, or they are not a tar archive at
    all. Reads the whole file (blocking: run it in a thread); leaves it at the start."""
    archive.seek(0)
    found = hashlib.sha256()
    while chunk := archive.read(1024 * 1024):
        found.update(chunk)
    archive.seek(0)
    if f"sha256:{found.hexdigest()}" != digest:
        return (f"its content is not the archive that was saved (sha256:"
                f"{found.hexdigest()[:16]}..., recorded {digest[:23]}...)")
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for _ in tar:
                pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"it is not a readable tar archive ({exc})"
    finally:
        archive.seek(0)
    return None


def restore_failure(name: str, node: str, tries: int, last_error: str) -> str:
    """The error of a delivery that could not restore checkpoint ``name`` (its hand-back
    also names the checkpoint in the typed ``AttemptRecord.restore_failed``, which is
    what checkpoint_rules.restore_failures counts)."""
    return (f"could not restore checkpoint {name} on {node} ({tries} tries; last error: "
            f"{last_error})")
