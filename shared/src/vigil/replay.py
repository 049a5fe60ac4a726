"""Operator replay plumbing: read a stream range, re-publish it idempotently, rate and show it.

``vigil replay`` (see :mod:`vigil.cli_replay`) talks to NATS directly, as the ``operator``
NATS user. This module holds what its subcommands share, and ``vigil replay stream``:

- :class:`Window` and :class:`RangeReader`: the messages of one stream in a sequence or time
  window, read with an ephemeral ordered consumer (flow-controlled, nothing to clean up);
  the end is fixed when the read starts, so a replay into its own stream cannot chase its
  tail.
- Idempotent re-publishing: every re-published message carries
  ``Nats-Msg-Id: rp-<replay id>-<stream>-<seq>`` (the target stream's duplicate window
  drops a repeat), and the replay's progress (the last source sequence done) is kept in the
  ``vigil-replays`` bucket, so running the same replay again publishes nothing new even
  after that window, and a replay killed midway resumes where it stopped. The replay id
  defaults to a hash of what was asked (stream, filter, window, target), so the same
  command line is the same replay.
- the rate limit and the progress bar live in :mod:`vigil.progress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck, StreamInfo
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vigil import settings, subjects, topology
from vigil.conn import connect
from vigil.errors import NatsUnavailable, VigilError
from vigil.jetstream import retrying
from vigil.messages import ID_RE
from vigil.progress import ProgressBar, TokenBucket
from vigil.settings import redact_url

READ_STALL_S = 10.0  # an ordered consumer heartbeats every 5 s; twice that is a real stall
DEFAULT_RATE = 500.0
# Server-interpreted headers are not copied onto a re-published message: a source's own
# Nats-Msg-Id or Nats-Expected-* would dedupe or fence the copy against the original.
_SERVER_HEADER = "Nats-"
REPLAY_OF = "Vigil-Replay-Of"  # "<stream>:<seq>" on every re-published message
KV_OPERATION = "KV-Operation"


class ReplayError(VigilError):
    """A replay cannot go ahead as asked; the message says what to change."""


# connection -----------------------------------------------------------------------------
class OperatorSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = ""
    data_dir: str = ".vigil"


def operator_url(flag_url: str | None, flag_data_dir: str | None,
                 environ: dict[str, str] | None = None) -> str:
    """``--nats-url``, else ``VIGIL_NATS_URL``, else ``nats_operator_url`` (or ``nats_url``)
    from the ``client.json`` that ``vigil up`` writes into its data directory."""
    env_all = dict(os.environ) if environ is None else environ
    env = settings.load(OperatorSettings, {k: v for k, v in env_all.items()
                                           if k in ("VIGIL_NATS_URL", "VIGIL_DATA_DIR")})
    if flag_url:
        return flag_url
    if env.nats_url:
        return env.nats_url
    client_file = Path(flag_data_dir or env.data_dir) / "client.json"
    if client_file.exists():
        try:
            saved = msgspec.json.decode(client_file.read_bytes())
        except msgspec.DecodeError as exc:
            raise ReplayError(f"{client_file} is not valid JSON ({exc}); fix or remove it, "
                              "or pass --nats-url") from None
        url = saved.get("nats_operator_url") or saved.get("nats_url") if isinstance(
            saved, dict) else None
        if isinstance(url, str) and url:
            return url
    raise ReplayError(
        f"no NATS to talk to: start a local stack with `vigil up` (it writes {client_file}), "
        "or pass --nats-url / set VIGIL_NATS_URL (the operator user's credentials)")


async def operator_connect(url: str, wait_s: float = 5.0) -> NATS:
    """Connect as the ``operator`` user (its replies come on the operator's inbox only)."""
    try:
        # The outer bound as well: nats-py itself retries an initial connect forever when
        # reconnects are unlimited, so connect()'s own wait_s alone never ends.
        return await asyncio.wait_for(connect(url, "vigil-replay", wait_s=wait_s,
                                              inbox_prefix=subjects.inbox("operator")),
                                      wait_s + 1.0)
    except (NatsUnavailable, TimeoutError) as exc:
        raise NatsUnavailable(
            f"cannot reach NATS at {redact_url(url)} within {wait_s:g}s: is `vigil up` "
            "running? Pass --nats-url, or set VIGIL_NATS_URL (the operator user's URL)"
        ) from exc


STREAM_ALIASES = {s.name.removeprefix("VIGIL_").lower(): s.name for s in topology.STREAMS}


def stream_name(text: str) -> str:
    """``events`` -> ``VIGIL_EVENTS``; any other name is taken as it is."""
    return STREAM_ALIASES.get(text.lower(), text)


async def stream_info(js: JetStreamContext, name: str) -> StreamInfo:
    try:
        return await retrying(f"stream info {name}", lambda: js.stream_info(name))
    except NotFoundError:
        known = ", ".join(sorted(STREAM_ALIASES.values()))
        raise ReplayError(f"there is no stream {name!r}; Vigil's streams are {known} "
                          "(short names such as `events` work too)") from None


# windows ---------------------------------------------------------------------------------
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                       r"(?:(\d+(?:\.\d+)?)s)?$")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive = UTC), or a duration back from now: ``90s``, ``15m``,
    ``2h``, ``1d``, ``1h30m``."""
    match = _DURATION.match(text.strip())
    if text.strip() and match is not None and any(match.groups()):
        d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
        return (now or datetime.now(UTC)) - timedelta(days=d, hours=h, minutes=m, seconds=s)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReplayError(f"{text!r} is neither an ISO time (2024-05-01T12:00:00Z) nor a "
                          "duration back from now (90s, 15m, 2h, 1d)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    """Which messages of a stream: a subject filter, a sequence window, a time window.
    Every bound is inclusive; 0 / None means open."""

    subject: str | None = None
    from_seq: int = 0
    to_seq: int = 0
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, seq: int, when: datetime) -> bool:
        return (seq >= self.from_seq and (not self.to_seq or seq <= self.to_seq)
                and (self.since is None or when >= self.since)
                and (self.until is None or when <= self.until))


@dataclass(frozen=True)
class StoredMsg:
    stream: str
    seq: int
    subject: str
    time: datetime
    headers: dict[str, str]
    data: bytes


class RangeReader:
    """The messages of ``stream`` in ``window``, oldest first, as an async iterator.

    ``await reader.open()`` returns an upper bound of how many will come (for a progress
    bar). The window's end is the stream's last sequence at open time at the latest.
    ``headers_only`` skips the payloads (a dry run counts without moving the data).
    ``last_per_subject`` reads a KV bucket's current values.
    """

    def __init__(self, js: JetStreamContext, stream: str, window: Window = Window(), *,
                 headers_only: bool = False, last_per_subject: bool = False,
                 filter_subjects: list[str] | None = None) -> None:
        self.js, self.stream, self.window = js, stream, window
        self.headers_only, self.last_per_subject = headers_only, last_per_subject
        self.filter_subjects = filter_subjects
        self.end_seq = 0
        self.first_seq = 0  # the stream's oldest sequence at open time
        self.total = 0
        self._sub: Any = None

    async def open(self) -> int:
        info = await stream_info(self.js, self.stream)
        last = int(info.state.last_seq or 0)
        self.first_seq = int(info.state.first_seq or 0)
        self.end_seq = min(self.window.to_seq, last) if self.window.to_seq else last
        if not info.state.messages or self.end_seq < max(self.window.from_seq, 1):
            return 0
        config = ConsumerConfig(inactive_threshold=30.0, headers_only=self.headers_only or None)
        if self.last_per_subject:
            config.deliver_policy = DeliverPolicy.LAST_PER_SUBJECT
        elif self.window.from_seq > 1:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.window.from_seq
        elif self.window.since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.window.since
        else:
            config.deliver_policy = DeliverPolicy.ALL
        stream_subjects = list(info.config.subjects or [])
        subject = self.window.subject or ""
        if self.filter_subjects:
            config.filter_subjects = list(self.filter_subjects)
        elif not subject:
            if len(stream_subjects) == 1:
                subject = stream_subjects[0]
            else:
                config.filter_subjects = stream_subjects
        self._sub = await retrying(f"read {self.stream}", lambda: self.js.subscribe(
            subject, stream=self.stream, ordered_consumer=True, config=config))
        ci = await retrying(f"read {self.stream}", self._sub.consumer_info)
        self.total = int(ci.num_pending or 0) + int(ci.delivered.consumer_seq or 0)
        if self.total == 0:
            await self.close()
        return self.total

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def __aiter__(self) -> AsyncIterator[StoredMsg]:
        if self._sub is None:
            return
        try:
            while True:
                try:
                    msg = await self._sub.next_msg(timeout=READ_STALL_S)
                except nats.errors.TimeoutError:
                    raise NatsUnavailable(f"reading {self.stream} stalled for "
                                          f"{READ_STALL_S:.0f}s; try again") from None
                meta = msg.metadata
                seq = meta.sequence.stream
                # A bucket snapshot takes keys written meanwhile too: their older values
                # are not delivered (last per subject), so cutting there would lose keys.
                if seq > self.end_seq and not self.last_per_subject:
                    break
                if self.last_per_subject or self.window.admits(seq, meta.timestamp):
                    yield StoredMsg(self.stream, seq, msg.subject, meta.timestamp,
                                    dict(msg.headers or {}), msg.data)
                if meta.num_pending == 0 or (
                        self.window.until is not None and meta.timestamp > self.window.until):
                    break
        finally:
            await self.close()


async def read_all(js: JetStreamContext, stream: str, window: Window = Window(),
                   **kwargs: Any) -> list[StoredMsg]:
    reader = RangeReader(js, stream, window, **kwargs)
    await reader.open()
    return [m async for m in reader]


async def read_bucket(js: JetStreamContext, bucket: str) -> dict[str, tuple[bytes, int]]:
    """Every live key of a KV bucket -> (value, revision), in one ordered-consumer pass
    (one round trip per key would make a big bucket slow)."""
    prefix = f"$KV.{bucket}."
    found: dict[str, tuple[bytes, int]] = {}
    reader = RangeReader(js, f"KV_{bucket}", Window(subject=f"{prefix}>"), last_per_subject=True)
    await reader.open()
    async for m in reader:
        if m.headers.get(KV_OPERATION) in ("DEL", "PURGE") or "Nats-Marker-Reason" in m.headers:
            found.pop(m.subject[len(prefix):], None)
            continue
        found[m.subject[len(prefix):]] = (m.data, m.seq)
    return found


# ids --------------------------------------------------------------------------------------
def replay_id_for(stream: str, window_args: dict[str, Any], target: str) -> str:
    """A short, stable id of what was asked: the same command line is the same replay.
    Relative times (``--since 1h``) enter as written, so a rerun resumes the same replay."""
    canonical = msgspec.json.encode({"stream": stream, "window": window_args, "target": target},
                                    order="sorted")
    return "r" + hashlib.sha256(canonical).hexdigest()[:12]


def replay_msg_id(replay_id: str, stream: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of a re-published message: same source, same replay = same id.

    It is also a valid task id (``rp-<replay id>-<stream>-<seq>``, or ``rp-`` and a hash of
    those when that would pass 64 characters): a submission replayed into
    ``vigil.submit.*`` without an ``id`` of its own takes it as its task id (the id rule),
    so a batch re-published after a crash is a duplicate by id there, where the stream's
    duplicate window is only 100 ms (ADR 11)."""
    readable = f"rp-{replay_id}-{stream}-{seq}"
    if ID_RE.fullmatch(readable):
        return readable
    return "rp-" + hashlib.sha256(f"{replay_id}:{stream}:{seq}".encode()).hexdigest()[:40]


def replay_headers(source: dict[str, str], replay_id: str, stream: str, seq: int
                   ) -> dict[str, str]:
    headers = {k: v for k, v in source.items() if not k.startswith(_SERVER_HEADER)}
    headers[REPLAY_OF] = f"{stream}:{seq}"
    headers[subjects.MSG_ID] = replay_msg_id(replay_id, stream, seq)
    return headers


# stream replay --------------------------------------------------------------------------------
class ReplayProgress(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a replay's key in ``vigil-replays``."""

    stream: str
    filter: str | None
    target: str
    last_seq: int = 0
    published: int = 0
    updated_at: datetime | None = None
    # The source range's last sequence, fixed by the first run: a rerun never reaches
    # past it, so an open-ended window (``--since 1h``) cannot pick up what arrived since,
    # such as this replay's own copies when the target is in the source stream.
    end_seq: int = 0


@dataclass(frozen=True)
class ReplayPlan:
    replay_id: str
    stream: str
    window: Window
    target: str
    target_stream: str
    done_until: int  # source sequences up to here were published by earlier runs
    count: int
    first: StoredMsg | None
    last: StoredMsg | None


@dataclass
class ReplayResult:
    published: int = 0
    duplicates: int = 0  # the target's duplicate window dropped these (a crash's overlap)
    last_seq: int = 0


async def open_progress(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(subjects.KV_REPLAYS)
    except (NotFoundError, nats.js.errors.BucketNotFoundError):
        raise ReplayError(f"bucket {subjects.KV_REPLAYS} does not exist: start the services "
                          "once (they create Vigil's topology), e.g. `vigil up`") from None


async def load_progress(kv: KeyValue, replay_id: str) -> tuple[ReplayProgress | None, int]:
    try:
        entry = await retrying("read replay progress", lambda: kv.get(replay_id))
    except KeyNotFoundError:
        return None, 0
    if not entry.value:
        return None, 0
    return msgspec.json.decode(entry.value, type=ReplayProgress), int(entry.revision or 0)


async def plan_replay(js: JetStreamContext, stream: str, window: Window, target: str,
                      replay_id: str, *, limit: int = 0) -> ReplayPlan:
    """What ``--yes`` would publish: counted with a headers-only read (no payloads moved)."""
    if not ID_RE.fullmatch(replay_id):
        raise ReplayError(f"replay id {replay_id!r} must match [A-Za-z0-9_-]{{1,64}}")
    if any(c in target for c in "*> ") or not target:
        raise ReplayError(f"--to needs one concrete subject, not {target!r}")
    try:
        target_stream = await retrying("find target stream",
                                       lambda: js.find_stream_name_by_subject(target))
    except NotFoundError:
        raise ReplayError(
            f"no JetStream stream captures {target!r}: a replay re-publishes into a stream so "
            "that message ids make it idempotent; choose a subject under one of Vigil's "
            "streams (e.g. vigil.issues.replay.info)") from None
    kv = await open_progress(js)
    progress, _ = await load_progress(kv, replay_id)
    done_until = 0
    if progress is not None:
        if (progress.stream, progress.filter, progress.target) != (stream, window.subject,
                                                                    target):
            raise ReplayError(
                f"replay id {replay_id} was used for {progress.stream} "
                f"{progress.filter or '(all)'} -> {progress.target}; pick another --replay-id")
        done_until = progress.last_seq
    to_seq = window.to_seq
    if progress is not None and progress.end_seq:
        to_seq = min(to_seq, progress.end_seq) if to_seq else progress.end_seq
    else:
        # First run: pin the end of the range now, before anything is re-published.
        info = await retrying("stream info", lambda: js.stream_info(stream))
        last_now = int(info.state.last_seq or 0)
        to_seq = min(to_seq, last_now) if to_seq else last_now
    rest = Window(window.subject, max(window.from_seq, done_until + 1), to_seq,
                  window.since, window.until)
    reader = RangeReader(js, stream, rest, headers_only=True)
    await reader.open()
    count, first, last = 0, None, None
    async for m in reader:
        count += 1
        first = first or m
        last = m
        if limit and count >= limit:
            await reader.close()
            break
    return ReplayPlan(replay_id, stream, rest, target, target_stream, done_until, count,
                      first, last)


async def run_replay(js: JetStreamContext, plan: ReplayPlan, *, rate: float, err: TextIO,
                     batch: int = 0) -> ReplayResult:
    """Re-publish the planned messages, ``batch`` in flight at a time, rate-limited.

    Progress is written after each fully acknowledged batch (compare-and-set: a second run
    of the same replay at the same time is stopped, not interleaved). A crash repeats at
    most the batch in flight, and the target's duplicate window drops those repeats (for
    submissions, the task id the message id becomes: see :func:`replay_msg_id`). The
    default batch is a tenth of a second's worth (at most 64), so a slow replay records its
    progress often.
    """
    batch = batch or (max(1, min(64, int(rate / 10))) if rate > 0 else 64)
    kv = await open_progress(js)
    stored, revision = await load_progress(kv, plan.replay_id)
    progress = stored or ReplayProgress(stream=plan.stream, filter=plan.window.subject,
                                        target=plan.target, end_seq=plan.window.to_seq)
    result = ReplayResult(last_seq=progress.last_seq)
    if plan.count == 0:
        return result
    bucket = TokenBucket(rate)
    bar = ProgressBar(f"replay {plan.replay_id}", plan.count, err)
    window = Window(plan.window.subject, plan.window.from_seq,
                    plan.last.seq if plan.last else plan.window.to_seq,
                    plan.window.since, plan.window.until)
    reader = RangeReader(js, plan.stream, window)
    await reader.open()
    pending: list[tuple[StoredMsg, asyncio.Future[PubAck]]] = []

    async def settle() -> None:
        nonlocal revision, progress
        if not pending:
            return
        acks = await asyncio.gather(*(f for _, f in pending))
        result.published += sum(1 for a in acks if not a.duplicate)
        result.duplicates += sum(1 for a in acks if a.duplicate)
        result.last_seq = pending[-1][0].seq
        bar.advance(len(pending))
        pending.clear()
        progress = msgspec.structs.replace(
            progress, last_seq=result.last_seq, published=progress.published + len(acks),
            updated_at=datetime.now(UTC))
        revision = await _save_progress(kv, plan.replay_id, progress, revision)

    try:
        async for m in reader:
            await bucket.take()
            pending.append((m, asyncio.ensure_future(_republish(js, plan, m))))
            if len(pending) >= batch:
                await settle()
        await settle()
    finally:
        for _, fut in pending:
            fut.cancel()
        bar.close()
    return result


async def _republish(js: JetStreamContext, plan: ReplayPlan, m: StoredMsg) -> PubAck:
    headers = replay_headers(m.headers, plan.replay_id, m.stream, m.seq)

    async def once() -> PubAck:
        return await js.publish(plan.target, m.data, timeout=5.0, headers=headers)

    return await retrying(f"publish {plan.target}", once)


async def _save_progress(kv: KeyValue, replay_id: str, progress: ReplayProgress,
                         revision: int) -> int:
    data = msgspec.json.encode(progress)

    async def once() -> int:
        if revision:
            return int(await kv.update(replay_id, data, last=revision))
        return int(await kv.create(replay_id, data))

    try:
        return await retrying("save replay progress", once)
    except KeyWrongLastSequenceError:
        # A retry after a lost reply may find our own write: that is not a conflict.
        with contextlib.suppress(KeyNotFoundError):
            entry = await kv.get(replay_id)
            if entry.value == data:
                return int(entry.revision or 0)
        raise ReplayError(f"replay {replay_id} moved on under us: another `vigil replay` runs "
                          "the same replay; let it finish (rerunning later is safe)") from None
