"""Images this node lacks, loaded from the image store on first use (``vigil image push``).

No registry is reachable, so an image reaches a node in one of two ways: built or loaded
there by hand, or pushed once to ``vigil-images`` and loaded here by the first task that
needs it. The load is checked at every step, and a task runs on a loaded image only if all
pass:

- the archive's recorded size is within ``VIGIL_IMAGE_MAX_MB`` (before any byte is read)
  and the download stops the moment it would pass it;
- the downloaded bytes hash to the digest the pusher recorded (and the store's own);
- the archive holds the image the pusher recorded (its config is the image id) under its
  name and no other (a load re-points the names an archive carries: an archive that
  also named ``localhost/vigil-agent:latest`` would replace every task's default image);
- and, once loaded, Podman has that image id under that name.

A failed check is an :class:`ImageRefused`: the task fails, and the executor confesses
(a digest or id that does not match: ``image_tampered``, critical), the loaded image
removed again. Never a tampered image run. Podman refusing an intact archive is a
``ContainerError`` (the host's failure is handed back, a bad archive fails the task).

Tasks needing the same image on this node load it once: a lock per image, and whoever
waited on it finds the image present. The task's ``progress`` events say how the load
goes (``data.image_load``).
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from vigil import subjects
from vigil.errors import ImageNotFound, VigilError
from vigil.imagestore import PushedImage, find, pushed_images
from vigil.messages import MAX_ADVERTISED_IMAGES
from vigil_executor.checkpoint import CheckpointError, mib, read_object
from vigil_executor.podman_errors import PodmanError
from vigil_executor.runtime import ContainerError, Runtime

log = structlog.get_logger("vigil.executor.images")

PROGRESS_EVERY_S = 1.0  # at most one progress event a second while downloading ...
PROGRESS_STEP = 0.1  # ... or one per tenth of the archive, whichever comes first

Report = Callable[[dict[str, Any]], None]


class ImageRefused(VigilError):
    """A pushed image that may not run here: over the size limit, or not what was pushed.
    ``category`` names it for the confession."""

    def __init__(self, message: str, *, category: str) -> None:
        super().__init__(message, retryable=False)
        self.category = category
        self.severity = "critical" if category == "image_tampered" else "error"


class _TooLarge(Exception):
    pass


class ImageLoader:
    def __init__(self, js: JetStreamContext, runtime: Runtime, max_bytes: int) -> None:
        self._js = js
        self._runtime = runtime
        self._max = max_bytes
        self._locks: dict[str, asyncio.Lock] = {}

    async def pushed(self) -> list[PushedImage]:
        return await pushed_images(self._js)

    async def advertised(self) -> list[str] | None:
        """What this node advertises (ADR 12): the images it holds, and the pushed ones it
        would load on first use. None when the runtime cannot tell (or too many)."""
        held = await self._runtime.images()
        if held is None:
            return None
        try:
            pushed = [p.name for p in await self.pushed()]
        except Exception as exc:  # NATS away: the node's own images still stand
            log.warning("pushed_images_unread", error=str(exc) or type(exc).__name__)
            pushed = []
        names = sorted(set(held) | set(pushed))
        return names if len(names) <= MAX_ADVERTISED_IMAGES else None

    async def ensure(self, image: str, report: Report) -> None:
        """Make ``image`` present on this node: it is, or it is loaded from the store.
        Raises ImageNotFound when the store has no such image either."""
        found = find(await self.pushed(), image)
        if found is None:
            raise ImageNotFound(f"image {image} is not present, nor pushed to "
                                f"{subjects.OBJ_IMAGES}")
        lock = self._locks.setdefault(found.name, asyncio.Lock())
        async with lock:
            if await self._runtime.image_exists(image):
                log.info("image_loaded_meanwhile", image=image)
                return  # another task on this node loaded it while this one waited
            await self._load(found, report)

    async def _load(self, pushed: PushedImage, report: Report) -> None:
        name = pushed.name
        if pushed.size > self._max:
            raise ImageRefused(
                f"image {name} is {mib(pushed.size)} in the image store, over this "
                f"executor's limit of {mib(self._max)} (VIGIL_IMAGE_MAX_MB); it was not "
                "loaded", category="image_too_large")
        started = time.monotonic()
        progress = _Progress(name, pushed.size, report)
        progress.step("downloading", 0)
        with tempfile.TemporaryFile() as archive:
            size, sha = await self._download(pushed, archive, progress)
            found = f"sha256:{sha.hex()}"
            if found != pushed.digest or size != pushed.size:
                raise ImageRefused(
                    f"image {name} from the image store is not the archive that was pushed: "
                    f"{size} bytes hashing to {found[:23]}..., recorded {pushed.size} bytes "
                    f"and {pushed.digest[:23]}...; it was not loaded",
                    category="image_tampered")
            downloaded = time.monotonic() - started
            problem = await asyncio.to_thread(archive_problem, archive, pushed)
            if problem is not None:
                raise ImageRefused(f"image {name} from the image store: {problem}; it was not "
                                   "loaded", category="image_tampered")
            progress.step("loading", size)
            try:
                names = await self._runtime.load_image(archive)
            except PodmanError as exc:
                raise ContainerError(f"Podman could not load image {name} from the image "
                                     f"store: {exc}", cause=exc.cause,
                                     retryable=exc.retryable) from exc
        loaded_id = await self._runtime.image_id(name)
        if loaded_id is None or loaded_id.removeprefix("sha256:") != pushed.image_id:
            # The bytes are the pushed ones, yet the image is not the one recorded: never
            # run it (nor let the next task find it here).
            await self._runtime.remove_image(name)
            raise ImageRefused(
                f"image {name} loaded from the image store has id {loaded_id or 'none'} "
                f"(names {', '.join(names) or 'none'}), not the recorded "
                f"{pushed.image_id[:12]}; it was removed again", category="image_tampered")
        took = time.monotonic() - started
        progress.step("loaded", size, seconds=round(took, 2),
                      download_s=round(downloaded, 2))
        log.info("image_loaded", image=name, size=size, seconds=round(took, 2),
                 download_s=round(downloaded, 2))

    async def _download(self, pushed: PushedImage, into: IO[bytes], progress: _Progress
                        ) -> tuple[int, bytes]:
        store = await self._js.object_store(subjects.OBJ_IMAGES)
        try:
            info = await store.get_info(pushed.name)
        except (ObjectNotFoundError, NotFoundError):
            raise ImageNotFound(f"image {pushed.name} was removed from the image store "
                                "while it was being loaded") from None
        if (info.size or 0) > self._max:
            raise ImageRefused(f"image {pushed.name} grew to {mib(info.size or 0)} in the "
                               f"image store, over the limit of {mib(self._max)}",
                               category="image_too_large")

        def chunk(read: int) -> None:
            if read > self._max:
                raise _TooLarge
            progress.step("downloading", read)

        try:
            return await read_object(self._js, subjects.OBJ_IMAGES, info, into,
                                     what=f"image {pushed.name}", on_chunk=chunk)
        except _TooLarge:
            raise ImageRefused(f"image {pushed.name}'s archive passed the limit of "
                               f"{mib(self._max)} while downloading; it was not loaded",
                               category="image_too_large") from None
        except CheckpointError as exc:
            raise ImageRefused(f"image {pushed.name}: {exc}", category="image_tampered") \
                from None


class _Progress:
    """Progress events of one image load: each step, and the download paced."""

    def __init__(self, name: str, total: int, report: Report) -> None:
        self._name = name
        self._total = total
        self._report = report
        self._last_at = 0.0
        self._last_share = -1.0

    def step(self, step: str, done: int, **extra: Any) -> None:
        share = done / self._total if self._total else 1.0
        now = time.monotonic()
        if step == "downloading" and done not in (0, self._total) and (
                now - self._last_at < PROGRESS_EVERY_S
                and share - self._last_share < PROGRESS_STEP):
            return
        self._last_at, self._last_share = now, share
        self._report({"image_load": {"image": self._name, "step": step, "bytes": done,
                                     "total": self._total,
                                     "percent": round(100 * share, 1), **extra}})



def archive_problem(archive: IO[bytes], pushed: PushedImage) -> str | None:
    """Why a ``podman save`` archive (docker-archive) is not the image ``pushed`` records,
    or None: its ``manifest.json`` names one image, whose config is the recorded id, with
    the pushed name as its only name. Reads the tar's headers (blocking); leaves the file
    at its start."""
    archive.seek(0)
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            member = next((m for m in tar if m.name in ("manifest.json", "./manifest.json")),
                          None)
            found = tar.extractfile(member) if member is not None else None
            data = found.read() if found is not None else None
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"it is not a readable image archive ({exc})"
    finally:
        archive.seek(0)
    if data is None:
        return "it is not an image archive (no manifest.json; push it with vigil image push)"
    try:
        manifest = json.loads(data)
        (entry,) = manifest
        config, tags = str(entry["Config"]), list(entry.get("RepoTags") or [])
    except (ValueError, TypeError, KeyError) as exc:
        return f"its manifest.json is not one image's ({exc!r})"
    image_id = config.removeprefix("blobs/sha256/").removesuffix(".json")
    if image_id != pushed.image_id:
        return (f"it holds image {image_id[:12]}, not the recorded "
                f"{pushed.image_id[:12]}")
    if pushed.name not in tags or set(tags) - {pushed.name}:
        return (f"it names the image {', '.join(tags) or 'nothing'}, not just {pushed.name} "
                "(a load would re-point those names to it)")
    return None
