"""What an executor advertises of its images, from Podman's image list, and what it checks
of a pushed image's archive before loading it (pure logic)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from vigil.imagestore import PushedImage
from vigil.messages import MAX_ADVERTISED_IMAGES
from vigil_executor.images import archive_problem
from vigil_executor.podman import image_names

pytestmark = pytest.mark.unit


def test_names_from_the_libpod_image_list() -> None:
    listing = [
        {"Id": "8a55", "RepoTags": ["localhost/vigil-agent:latest"],
         "Names": ["localhost/vigil-agent:latest", "localhost/vigil-agent:d3306"]},
        {"Id": "2fe2", "RepoTags": None, "Names": ["localhost/base:bookworm-1"]},
        {"Id": "dead", "RepoTags": ["<none>:<none>"]},  # untagged: no name to run it by
    ]
    assert image_names(listing) == ["localhost/base:bookworm-1", "localhost/vigil-agent:d3306",
                                    "localhost/vigil-agent:latest"]
    assert image_names([]) == []


def test_too_many_names_advertise_none_rather_than_a_partial_list() -> None:
    # A partial list would make the scheduler hold back tasks this node could run.
    listing = [{"RepoTags": [f"localhost/i{n}:1"]} for n in range(MAX_ADVERTISED_IMAGES + 1)]
    assert image_names(listing) is None
    assert image_names(listing[:-1]) is not None


def _archive(manifest: object | None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        layer = b"layer bytes"
        info = tarfile.TarInfo("abc/layer.tar")
        info.size = len(layer)
        tar.addfile(info, io.BytesIO(layer))
        if manifest is not None:
            data = json.dumps(manifest).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(7)
    return buf


PUSHED = PushedImage(name="localhost/a:1", image_id="f" * 64, size=1, digest="sha256:x")


def test_an_archive_must_hold_the_recorded_image_under_its_name_only() -> None:
    good = [{"Config": "f" * 64 + ".json", "RepoTags": ["localhost/a:1"]}]
    archive = _archive(good)
    assert archive_problem(archive, PUSHED) is None
    assert archive.tell() == 0  # left at its start, for the load
    other_id = [{"Config": "e" * 64 + ".json", "RepoTags": ["localhost/a:1"]}]
    assert archive_problem(_archive(other_id), PUSHED) == (
        "it holds image eeeeeeeeeeee, not the recorded ffffffffffff")
    # A load re-points every name an archive carries: one more is refused.
    clobber = [{"Config": "f" * 64 + ".json",
                "RepoTags": ["localhost/a:1", "localhost/vigil-agent:latest"]}]
    problem = archive_problem(_archive(clobber), PUSHED)
    assert problem is not None and "a load would re-point those names" in problem
    unnamed = [{"Config": "f" * 64 + ".json", "RepoTags": None}]
    assert "names the image nothing" in (archive_problem(_archive(unnamed), PUSHED) or "")
    two = [good[0], good[0]]
    assert "not one image's" in (archive_problem(_archive(two), PUSHED) or "")
    assert "no manifest.json" in (archive_problem(_archive(None), PUSHED) or "")
    assert "not a readable image archive" in (
        archive_problem(io.BytesIO(b"\x01" * 2048), PUSHED) or "")
