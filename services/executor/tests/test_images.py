"""What an executor advertises of its images, from Podman's image list (pure logic)."""

from __future__ import annotations

import pytest

from vigil.messages import MAX_ADVERTISED_IMAGES
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
