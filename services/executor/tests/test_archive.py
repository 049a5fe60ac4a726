"""Unit test: Podman's two archive layouts both become workspace-relative tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from vigil_executor.podman import END_OF_ARCHIVE, relative_tar, tar_end

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
