"""Image archives in the object store ``vigil-images``: what ``vigil image push`` writes
and an executor that lacks a task's image loads (docs/decisions/0015).

An object is one image's ``podman save`` archive, named by the image's full name
(``localhost/agent:v2``). Its metadata headers record what the pusher saw: the image id
(Podman's, the sha256 of its config), the archive's SHA-256 and size. An executor checks
all three before the image may run: the bytes it downloaded hash to the recorded digest,
and the image it loaded has the recorded id.

Listing reads the store's metadata records by subject (one ``STREAM.MSG.GET`` each, the
names from the stream's per-subject counts): no consumer, and no
``$JS.API.STREAM.NAMES``, which least-privilege users may not ask.
"""

from __future__ import annotations

import base64
import functools
import json
from datetime import datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo
from nats.js.errors import NotFoundError

from vigil import subjects
from vigil.imagenames import matches
from vigil.jetstream import retrying

STREAM = f"OBJ_{subjects.OBJ_IMAGES}"
HEADER_ID = "Vigil-Image-Id"
HEADER_DIGEST = "Vigil-Archive-Digest"
HEADER_SIZE = "Vigil-Archive-Size"
HEADER_BY = "Vigil-Pushed-By"
MAX_MB_DEFAULT = 4096.0
"""The largest image archive pushed or loaded by default, in MiB (VIGIL_IMAGE_MAX_MB)."""


class PushedImage(msgspec.Struct, frozen=True, kw_only=True):
    """One image in ``vigil-images``, as its pusher recorded it."""

    name: str
    """Its full name (``localhost/agent:v2``): the object's name."""
    image_id: str
    """Podman's image id (sha256 hex of its config): what a load must produce."""
    size: int
    """The archive's size in bytes."""
    digest: str
    """``sha256:<hex>`` of the archive."""
    pushed_at: datetime | None = None
    pushed_by: str | None = None

    def headers(self) -> dict[str, list[str]]:
        """The object's metadata headers (NATS headers: a list of values per name)."""
        found = {HEADER_ID: [self.image_id], HEADER_DIGEST: [self.digest],
                 HEADER_SIZE: [str(self.size)]}
        if self.pushed_by:
            found[HEADER_BY] = [self.pushed_by]
        return found


def _header(headers: dict[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def pushed_from(info: ObjectInfo) -> PushedImage | None:
    """The image an object's metadata describes; None for a deleted object, or one that
    is not a pushed image (no id or digest recorded)."""
    if info.deleted:
        return None
    headers = info.headers or {}
    image_id, digest = _header(headers, HEADER_ID), _header(headers, HEADER_DIGEST)
    size = _header(headers, HEADER_SIZE)
    if image_id is None or digest is None or size is None or not size.isdigit():
        return None
    pushed_at = None
    if info.mtime:
        try:
            pushed_at = datetime.fromisoformat(info.mtime.replace("Z", "+00:00"))
        except ValueError:
            pushed_at = None
    return PushedImage(name=info.name, image_id=image_id, size=int(size), digest=digest,
                       pushed_at=pushed_at, pushed_by=_header(headers, HEADER_BY))


def meta_subject(name: str) -> str:
    """The subject of image ``name``'s metadata record (the object store's encoding)."""
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    return f"$O.{subjects.OBJ_IMAGES}.M.{encoded}"


async def object_infos(js: JetStreamContext) -> list[ObjectInfo]:
    """Every object's metadata record (deleted ones too), by name."""
    try:
        info = await retrying("list images", lambda: js.stream_info(
            STREAM, subjects_filter=subjects.object_metas(subjects.OBJ_IMAGES)))
    except NotFoundError:
        return []
    found = []
    for subject in sorted(info.state.subjects or {}):
        try:
            msg = await retrying("read image metadata", functools.partial(
                js.get_last_msg, STREAM, subject))
        except NotFoundError:
            continue  # removed in between
        if msg.data:
            found.append(ObjectInfo.from_response(json.loads(msg.data)))
    return sorted(found, key=lambda i: i.name)


async def pushed_images(js: JetStreamContext) -> list[PushedImage]:
    """The images in the store, by name."""
    return [p for info in await object_infos(js) if (p := pushed_from(info)) is not None]


def find(pushed: list[PushedImage], image: str) -> PushedImage | None:
    """The pushed image a task's ``image`` reference names: by exact name first, then as
    leniently as Podman resolves a name (:func:`vigil.imagenames.matches`)."""
    exact = next((p for p in pushed if p.name == image), None)
    return exact or next((p for p in pushed if matches(p.name, image)), None)
