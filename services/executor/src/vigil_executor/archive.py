"""Workspace archives: Podman's tar of the workspace made workspace-relative, and where a
tar ends. Pure functions over file objects (blocking: call them in a thread).

What Podman 4.3 emits for ``GET /containers/{id}/archive?path=/workspace`` (measured here;
docs/decisions/0008): ustar headers, with a PAX ``x`` record for a name or hard-link
target that does not fit ustar's name/prefix split or is not ASCII (never GNU ``L``/``K``
records); member names ``workspace/...`` for a running container and ``/...`` for a
stopped one; hard links whose target is named the same way; mtimes rounded to whole
seconds (no PAX ``mtime``). The importer (``PUT``) takes PAX and GNU archives alike.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)

# Member names are bytes on Linux and need not be UTF-8. Decoded with surrogateescape they
# survive as str; encoded back the same way they are the agent's bytes again (tarfile
# marks such PAX records ``hdrcharset=BINARY``). Spelled out rather than taken from the
# executor's locale, which may not be UTF-8.
ENCODING = "utf-8"
ERRORS = "surrogateescape"
# PAX, as Podman's own archives: its importer reads what its exporter writes, and names
# of any length, hard-link targets included, round-trip (GNU would as well; ustar cannot
# hold a name over 255 bytes).
FORMAT = tarfile.PAX_FORMAT
# Records that name the member: relative_tar sets the name and link target, and a stale
# record would win over them when the member is written again (tarfile gives an
# existing PAX record priority), putting the member back under ``workspace/``.
NAME_RECORDS = ("path", "linkpath", "hdrcharset")
# Records of the owner: relative_tar makes every member the agent's root's (see there).
OWNER_RECORDS = ("uid", "gid", "uname", "gname")


def tar_end(archive: BinaryIO) -> int | None:
    """Where the last member of the tar at ``archive``'s position ends (its end-of-archive
    marker starts there), as a file offset; None when it cannot be read as a tar (then
    the whole body goes, and Podman says what is wrong with it). Moves the file position."""
    try:
        with tarfile.open(fileobj=archive, mode="r:", encoding=ENCODING, errors=ERRORS) as tar:
            for _ in tar:
                pass
            return tar.offset
    except (tarfile.TarError, OSError, EOFError):
        return None


def relative_tar(src: BinaryIO, dst: BinaryIO, dirname: str) -> None:
    """Copy Podman's archive of directory ``dirname``, naming members (and hard-link
    targets) relative to that directory. Symlink targets are the agent's data and are
    copied as they are (``/workspace/x`` resolves in the next container too).

    Raises ``tarfile.TarError`` for a member outside the directory: Podman never writes
    one, and unpacking it elsewhere than it was would be a silent corruption.

    Every member is owned by uid/gid 0, the agent's root. Podman 4.3 exports a container
    in a user namespace of its own with the owners *not* mapped back (measured: the
    agent's root's files came out as 2049/2049, an id of the Podman user's namespace),
    and its import maps them as container ids again: into another agent's namespace
    that failed the restore ("container ID 2049 cannot be mapped to a host ID") or gave
    the files to a stranger. An agent has no CAP_CHOWN nor CAP_SETUID, so everything in
    its workspace is its root's: 0 is the owner it had, whatever the export says.
    """
    prefix: str | None = None  # decided by the first member: the directory's own entry

    def relative(name: str) -> str:
        bare = name.lstrip("/")
        if not prefix:
            return bare
        if bare.startswith(prefix):
            return bare[len(prefix):]
        raise tarfile.TarError(f"member {name!r} is outside the archived {dirname}")

    with tarfile.open(fileobj=src, mode="r:", encoding=ENCODING, errors=ERRORS) as tin, \
            tarfile.open(fileobj=dst, mode="w", format=FORMAT, encoding=ENCODING,
                         errors=ERRORS) as tout:
        for member in tin:
            if prefix is None:
                own = member.name.lstrip("/")
                prefix = dirname + "/" if own == dirname else ""
                if own in ("", ".", dirname):
                    continue  # the directory itself: the workspace mount already exists
            name = relative(member.name)
            if not name or name == ".":
                continue
            member.name = name
            if member.islnk():
                # A hard link names another member: renamed with it, or the importer
                # fails the whole restore ("link /workspace/a /b: no such file").
                member.linkname = relative(member.linkname)
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            member.pax_headers = {k: v for k, v in member.pax_headers.items()
                                  if k not in NAME_RECORDS and k not in OWNER_RECORDS}
            data = tin.extractfile(member) if member.isreg() else None
            tout.addfile(member, data)
