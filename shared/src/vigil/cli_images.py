"""``vigil image``: push an image once; every executor loads it on first use.

No registry is reachable, so an image reaches the executors through the object store
vigil-images (docs/decisions/0015). `push` saves a local image (`podman save`, as the
rootless Podman user when run as root), refuses one over the limit before uploading a
byte, and uploads the archive with its image id, SHA-256 and size recorded; an executor
that lacks a task's image downloads it, checks all three, and loads it.

Images are the platform's, shared by every tenant (as an image built on a node is), so
these commands talk to NATS directly with the operator's credentials, like `vigil
replay`, rather than through the gateway: an archive is hundreds of megabytes, more
than a tenant's API should carry, and no tenant's token may replace what every tenant
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hashlib
import json
import os
import pwd
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, TextIO

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import NotFoundError, ObjectNotFoundError

from vigil import replay, subjects
from vigil.cli_config import environ
from vigil.cli_output import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    age,
    exit_epilog,
    out_json,
    table,
    terminal_width,
)
from vigil.cli_replay import CONNECTION
from vigil.errors import VigilError
from vigil.imagenames import matches
from vigil.imagestore import MAX_MB_DEFAULT, PushedImage, find, pushed_images
from vigil.jetstream import retrying
from vigil.progress import ProgressBar

MIB = 1024 * 1024
CHUNK = 512 * 1024  # object store chunks: a quarter of the fsyncs of nats-py's 128 KiB
IMAGE_MAX_MB = "VIGIL_IMAGE_MAX_MB"


class ImageError(VigilError):
    pass


# podman -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Podman:
    """How to run the podman CLI of the rootless Podman that executors use."""

    argv: list[str]
    cwd: str | None = None  # the rootless user's home: it may not enter ours

    async def run(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv, *args, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def podman_for(user: str | None) -> Podman:
    """As ``user`` (default vigil) when run as root, with its home and runtime directory
    (as ``vigil up``'s Podman service runs), else as whoever runs this."""
    podman = shutil.which("podman")
    if podman is None:
        raise ImageError("podman is not installed here; push from a host with the image")
    if os.geteuid() != 0:
        return Podman([podman])
    from vigil.embedded import podman_runtime_dir

    name = user or "vigil"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ImageError(f"user {name!r} for rootless Podman does not exist; pass "
                         "--podman-user") from None
    runtime = podman_runtime_dir(pw.pw_uid, pw.pw_gid)
    # runuser lives in sbin, which a root shell's PATH may lack (sudo, cron, CI).
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), None)
    if runuser is None:
        raise ImageError("runuser (util-linux) is not installed: it runs podman as the "
                         f"rootless user {name}")
    # A clean environment, as the Podman service of `vigil up` gets: ours (XDG_CONFIG_HOME
    # and the like) would point the user's podman at files it may not read.
    return Podman([runuser, "-u", name, "--", "env", "-i", f"HOME={pw.pw_dir}",
                   f"USER={name}", f"LOGNAME={name}", f"XDG_RUNTIME_DIR={runtime}",
                   "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   podman], cwd=pw.pw_dir)


async def inspect(podman: Podman, image: str) -> dict[str, Any]:
    """``podman image inspect``'s record of ``image``."""
    proc = await podman.run("image", "inspect", "--format", "json", image)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        why = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        if "image not known" in why or "no such image" in why.lower():
            raise ImageError(f"podman has no image {image!r} here; build or load it first")
        raise ImageError(f"podman image inspect {image} failed: {why}")
    found = json.loads(out)
    if not isinstance(found, list) or not found or not isinstance(found[0], dict):
        raise ImageError(f"podman image inspect {image} answered {out[:200]!r}")
    record: dict[str, Any] = found[0]
    return record


def full_name(record: dict[str, Any], image: str) -> str:
    """The name the image is pushed under: its own full name that ``image`` means."""
    names = [n for n in [*(record.get("RepoTags") or []), *(record.get("Names") or [])]
             if isinstance(n, str) and not n.startswith("<none>")]
    for name in names:
        if matches(name, image):
            return name
    if names and str(record.get("Id", "")).startswith(image.removeprefix("sha256:")):
        raise ImageError(f"{image} is an image id; push it by one of its names: "
                         f"{', '.join(sorted(set(names)))}")
    raise ImageError(f"image {image} has no name to push it by; tag it first "
                     "(podman tag IMAGE localhost/NAME:TAG)")


async def save(podman: Podman, name: str, into: IO[bytes], limit: int, err: TextIO,
               estimate: int) -> tuple[int, str]:
    """``podman save`` of ``name`` into ``into``: (size, ``sha256:<hex>``). Stops (and
    kills podman) the moment the archive passes ``limit``."""
    proc = await podman.run("save", "--format", "docker-archive", name)
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read())
    digest = hashlib.sha256()
    size = 0
    bar = ProgressBar("save MiB", max(1, estimate // MIB), err)
    try:
        while chunk := await proc.stdout.read(MIB):
            size += len(chunk)
            if size > limit:
                raise ImageError(_too_large(name, f"its archive passed {size // MIB} MiB",
                                            limit))
            digest.update(chunk)
            await asyncio.to_thread(into.write, chunk)
            bar.advance(size // MIB - bar.done)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # stopped reading: podman must not write on into a full pipe
        raise
    finally:
        bar.close()
        await proc.wait()
    if proc.returncode != 0:
        raise ImageError(f"podman save {name} failed (exit {proc.returncode}): "
                         f"{(await errors).decode(errors='replace').strip()[-500:]}")
    into.flush()
    return size, f"sha256:{digest.hexdigest()}"


def _too_large(name: str, what: str, limit: int) -> str:
    return (f"image {name} is too large to push: {what}, over the limit of "
            f"{limit // MIB} MiB (--max-mb, {IMAGE_MAX_MB}; executors refuse archives over "
            "their own VIGIL_IMAGE_MAX_MB); nothing was uploaded")


class _Counted:
    """A file whose reads (by the object store's upload, in a thread) advance a bar."""

    def __init__(self, f: IO[bytes], bar: ProgressBar) -> None:
        self._f = f
        self._bar = bar
        self._read = 0

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        self._read += n or 0
        self._bar.advance(self._read // MIB - self._bar.done)
        return int(n or 0)


# commands ------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _nats(args: argparse.Namespace) -> AsyncIterator[JetStreamContext]:
    url = replay.operator_url(args.nats_url, args.data_dir, environ())
    nc = await replay.operator_connect(url)
    try:
        yield nc.jetstream(timeout=10.0)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _limit(args: argparse.Namespace) -> int:
    value = args.max_mb
    if value is None:
        raw = environ().get(IMAGE_MAX_MB, "")
        try:
            value = float(raw) if raw else MAX_MB_DEFAULT
        except ValueError:
            raise ImageError(f"{IMAGE_MAX_MB}={raw!r} is not a number of MiB") from None
    if value <= 0:
        raise ImageError("--max-mb must be more than 0")
    return int(value * MIB)


async def cmd_push(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    limit = _limit(args)
    podman = podman_for(args.podman_user)
    record = await inspect(podman, args.image)
    name = full_name(record, args.image)
    image_id = str(record.get("Id", "")).removeprefix("sha256:")
    estimate = int(record.get("Size") or 0)
    if estimate > limit:  # refused before anything is saved or uploaded
        raise ImageError(_too_large(name, f"podman reports {estimate // MIB} MiB", limit))
    started = time.monotonic()
    with tempfile.TemporaryFile() as archive:
        size, digest = await save(podman, name, archive, limit, err, estimate)
        saved_s = time.monotonic() - started
        pushed = PushedImage(name=name, image_id=image_id, size=size, digest=digest,
                             pushed_by=f"{getpass.getuser()}@{socket.gethostname()}")
        async with _nats(args) as js:
            store = await retrying("open the image store",
                                   lambda: js.object_store(subjects.OBJ_IMAGES))
            with contextlib.suppress(ObjectNotFoundError, NotFoundError):
                info = await store.get_info(name)
                current = (info.headers or {}).get("Vigil-Archive-Digest")
                if current in ([digest], digest):
                    out.write(f"{name} ({image_id[:12]}) is pushed already: the same "
                              f"{size / MIB:.1f} MiB archive ({digest[:19]}…)\n")
                    return EXIT_OK
            archive.seek(0)
            bar = ProgressBar("upload MiB", max(1, size // MIB), err)
            meta = ObjectMeta(name=name, headers=pushed.headers(),
                              description=f"image {name} ({image_id[:12]}), vigil image push",
                              options=ObjectMetaOptions(max_chunk_size=CHUNK))
            upload_started = time.monotonic()
            try:
                # A retry uploads again from the start: the chunks of a failed put are
                # purged, and a put replaces the object whole.
                async def put() -> object:
                    archive.seek(0)
                    return await store.put(name, _Counted(archive, bar), meta=meta)  # type: ignore[arg-type]

                await retrying(f"upload {name}", put, deadline_s=120)
            finally:
                bar.close()
            upload_s = time.monotonic() - upload_started
    total = time.monotonic() - started
    if args.json:
        out.write(out_json({**msgspec.to_builtins(pushed), "save_s": round(saved_s, 2),
                            "upload_s": round(upload_s, 2)}) + "\n")
        return EXIT_OK
    out.write(f"pushed {name} ({image_id[:12]}): {size / MIB:.1f} MiB, {digest[:19]}…, in "
              f"{total:.1f}s (save {saved_s:.1f}s, upload {upload_s:.1f}s, "
              f"{size / MIB / max(upload_s, 1e-3):.0f} MiB/s); executors load it on first "
              "use\n")
    return EXIT_OK


async def cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _nats(args) as js:
        found = await pushed_images(js)
    if args.json:
        out.write(out_json({"images": found}) + "\n")
        return EXIT_OK
    if not found:
        err.write("no images pushed (vigil image push IMAGE)\n")
        return EXIT_OK
    rows = [(p.name, p.image_id[:12], f"{p.size / MIB:.1f}",
             age(p.pushed_at) if p.pushed_at else "-", p.pushed_by or "-", p.digest[:19])
            for p in found]
    for line in table(("NAME", "ID", "MIB", "AGE", "BY", "DIGEST"), rows,
                      right=frozenset({2, 3}), width=terminal_width(out)):
        out.write(line + "\n")
    return EXIT_OK


async def cmd_rm(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with _nats(args) as js:
        pushed = find(await pushed_images(js), args.image)
        if pushed is None:
            err.write(f"vigil: no image {args.image!r} in {subjects.OBJ_IMAGES}\n")
            return EXIT_TASK_FAILED
        store = await js.object_store(subjects.OBJ_IMAGES)
        await retrying(f"remove {pushed.name}", lambda: store.delete(pushed.name))
    if args.json:  # what was removed
        out.write(out_json(pushed) + "\n")
        return EXIT_OK
    out.write(f"removed {pushed.name} ({pushed.image_id[:12]}) from the image store; "
              "executors that loaded it keep it\n")
    return EXIT_OK


def _entry(impl: Any) -> Any:
    async def run(args: argparse.Namespace) -> int:
        code: int = await impl(args, sys.stdout, sys.stderr)
        return code
    return run


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``image`` to the ``vigil`` parser."""
    img = sub.add_parser(
        "image", help="push images to the image store; executors load them on first use",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n", 1)[1].strip(),
        epilog=f"""examples:
  vigil image push localhost/agent:v2
  vigil image list
  vigil image rm localhost/agent:v2

--json: push prints the pushed image's record (and save_s, upload_s); list
  {{"images": [...]}}; rm the removed image's record.

{CONNECTION}

""" + exit_epilog((EXIT_OK, "done"), (EXIT_TASK_FAILED, "rm: no such image"),
                  (EXIT_USAGE, "bad input or podman failed"),
                  (EXIT_UNREACHABLE, "no NATS"), common=False))
    actions = img.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    push = actions.add_parser("push", help="save a local image and upload it")
    push.add_argument("image", help="a local image's name (podman image ls)")
    push.add_argument("--max-mb", type=float, metavar="MIB",
                      help=f"refuse a larger archive ({IMAGE_MAX_MB}, default "
                      f"{MAX_MB_DEFAULT:g})")
    push.add_argument("--podman-user", help="the rootless Podman user when run as root "
                      "(default vigil, as for vigil up)")
    push.set_defaults(func=_entry(cmd_push))
    ls = actions.add_parser("list", help="list the pushed images")
    ls.set_defaults(func=_entry(cmd_list))
    rm = actions.add_parser("rm", help="remove a pushed image from the store")
    rm.add_argument("image")
    rm.set_defaults(func=_entry(cmd_rm))
    for p in actions.choices.values():
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--nats-url", help="the operator's NATS URL (VIGIL_NATS_URL)")
        p.add_argument("--data-dir", help="a vigil up data directory, for its client.json")

