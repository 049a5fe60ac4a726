"""Unit test: Podman's two archive layouts both become workspace-relative tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from vigil_executor.archive import END_OF_ARCHIVE, relative_tar, tar_end

pytestmark = pytest.mark.unit


def make_tar(names: list[str]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                info.name = name.rstrip("/") or "/"
                tar.addfile(info)
            else:
                data = name.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("names", [
    ["workspace/", "workspace/count", "workspace/workspace/inner"],  # running container
    ["/", "/count", "/workspace/inner"],                              # stopped container
])
def test_relative_tar(names: list[str]) -> None:
    out = io.BytesIO()
    relative_tar(make_tar(names), out, "workspace")
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        assert tar.getnames() == ["count", "workspace/inner"]
        member = tar.extractfile("count")
        assert member is not None and member.read().endswith(b"count")


def test_tar_end_finds_the_end_of_archive_marker() -> None:
    """A restore sends the archive up to its end marker, without the record padding: Podman
    stops reading at the marker and fails the request ("broken pipe") on padding it did
    not read (containers/buildah#6573)."""
    src = make_tar(["a", "b/", "b/c"])
    raw = src.getvalue()
    assert len(raw) == tarfile.RECORDSIZE  # padded to a 10 KiB record
    end = tar_end(src)
    assert end is not None and end % tarfile.BLOCKSIZE == 0 and end < len(raw) - 1024
    assert raw[end:] == bytes(len(raw) - end)  # only zeros are left out
    trimmed = io.BytesIO(raw[:end] + END_OF_ARCHIVE)
    with tarfile.open(fileobj=trimmed) as tar:
        assert tar.getnames() == ["a", "b", "b/c"]
    # Relative to where the archive starts in the file, as the restore reads it.
    shifted = io.BytesIO(b"x" * 100 + raw)
    shifted.seek(100)
    assert tar_end(shifted) == end + 100
    assert tar_end(make_tar([])) == 0  # an empty workspace: only the marker is sent
    assert tar_end(io.BytesIO(b"not a tar archive" * 64)) is None  # Podman says why


LONG = "/".join(f"seg{i:02d}_" + "d" * 40 for i in range(7))  # > 255 bytes: a PAX path
NAME_MAX = "n" * 255
LATIN1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # not UTF-8: bytes on disk


def podman_like(root: str) -> io.BytesIO:
    """An archive shaped like Podman's (ustar with PAX records for long or non-ASCII
    names) of a workspace with hard links, symlinks and long names, under ``root``:
    ``workspace/`` for a running container, ``/`` for a stopped one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
                link: str = "", mode: int = 0o644) -> None:
            info = tarfile.TarInfo(root + name if name else root.rstrip("/") or "/")
            info.type, info.mode, info.mtime, info.size = kind, mode, 1_600_000_000, len(data)
            info.linkname = link
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("", tarfile.DIRTYPE, mode=0o755)
        add("a", data=b"shared")
        add("b", tarfile.LNKTYPE, link=root + "a")
        add(LONG, tarfile.DIRTYPE, mode=0o751)
        add(LONG + "/deep", tarfile.LNKTYPE, link=root + "a")
        add(NAME_MAX, tarfile.LNKTYPE, link=root + LONG + "/deep")
        add(LATIN1, data=b"latin1", mode=0o600)
        add("rel", tarfile.SYMTYPE, link="a", mode=0o777)
        add("abs", tarfile.SYMTYPE, link="/workspace/a", mode=0o777)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("root", ["workspace/", "/"])
def test_relative_tar_renames_link_targets_and_drops_stale_pax_names(root: str) -> None:
    """Hard-link targets are members too and must be renamed with them (Podman answered
    the import of such an archive with HTTP 500 "link /workspace/a /b: no such file");
    a PAX path record must not keep the old name (tarfile lets it win when the member is
    written again, which unpacked long and non-ASCII names under workspace/workspace)."""
    out = io.BytesIO()
    relative_tar(podman_like(root), out, "workspace")
    raw = out.getvalue()
    assert b"workspace/" not in raw.replace(b"/workspace/a", b"")  # only the symlink's
    out.seek(0)
    with tarfile.open(fileobj=out, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.format == tarfile.PAX_FORMAT
    assert sorted(members) == sorted(["a", "b", LONG, LONG + "/deep", NAME_MAX, LATIN1,
                                      "rel", "abs"])
    assert members["b"].islnk() and members["b"].linkname == "a"
    assert members[LONG + "/deep"].linkname == "a"
    assert members[NAME_MAX].linkname == LONG + "/deep"
    assert members["rel"].linkname == "a"  # symlink targets are data: untouched
    assert members["abs"].linkname == "/workspace/a"
    assert members[LONG].mode == 0o751 and members[LATIN1].mode == 0o600
    assert all(m.mtime == 1_600_000_000 for m in members.values())
    assert b"caf\xe9" in raw  # the name's own bytes, not a replacement character
    for m in members.values():  # a PAX record, where one is needed, says the same
        assert m.pax_headers.get("path", m.name).rstrip("/") == m.name
        assert m.pax_headers.get("linkpath", m.linkname) == m.linkname


def test_relative_tar_refuses_a_member_outside_the_directory() -> None:
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w") as tar:
        for name in ("workspace", "workspace/a", "elsewhere/b"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    src.seek(0)
    with pytest.raises(tarfile.TarError, match="outside the archived workspace"):
        relative_tar(src, io.BytesIO(), "workspace")


def test_every_member_becomes_the_agents_roots() -> None:
    """Podman 4.3 exports an agent in its own user namespace with its root's files owned
    by an id of the Podman user's namespace (2049 here); imported as is, another agent's
    restore fails. Owners are reset to 0, PAX owner records included."""
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("workspace", "workspace/d"):
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 2049
            info.uname = info.gname = "stranger"
            info.pax_headers = {"uid": "3000000", "gid": "3000000"}  # past ustar's field
            if name == "workspace":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"data"))
    src.seek(0)
    out = io.BytesIO()
    relative_tar(src, out, "workspace")
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.uid, member.gid, member.uname, member.gname) == (
            "d", 0, 0, "", "")
        assert tar.extractfile(member).read() == b"data"  # type: ignore[union-attr]
