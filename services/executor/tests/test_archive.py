"""Unit test: Podman's two archive layouts both become workspace-relative tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from vigil_executor.podman import relative_tar

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
