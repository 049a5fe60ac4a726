"""How an image reference names an image: the one rule for every service that judges it.

Podman resolves a reference leniently (a short name such as ``vigil-agent`` finds
``localhost/vigil-agent:latest``; a missing tag is ``latest``; Docker Hub's ``library/``),
so :func:`matches` does too. The scheduler places tasks by the names executors advertise
(ADR 12); an executor finds a pushed image archive (``vigil image push``) by its name.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

_IMAGE_ID = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


class Ref(NamedTuple):
    domain: str | None  # None for a short name
    path: str
    tag: str


@functools.lru_cache(maxsize=4096)  # the dispatcher asks for every queued entry
def parse(ref: str) -> Ref | None:
    """``[domain/]path[:tag]`` of a reference; None for one that names no tag (a digest,
    an image id), which names alone cannot judge."""
    if "@" in ref or _IMAGE_ID.match(ref):
        return None
    name, tag = ref, "latest"
    slash, colon = ref.rfind("/"), ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1:]
    first, sep, rest = name.partition("/")
    domain: str | None = None
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, name = first, rest
    if domain in _DOCKER_HUB:
        domain = "docker.io"
        if "/" not in name:
            name = f"library/{name}"
    return Ref(domain, name, tag)


def matches(name: str, image: str) -> bool:
    """Whether an image called ``name`` (a full name, as Podman lists it) can be what a
    task's ``image`` reference means. False when either names no tag (a digest, an id):
    only an exact match tells then."""
    if name == image:
        return True
    have, want = parse(name), parse(image)
    if have is None or want is None or have.tag != want.tag:
        return False
    if want.domain is not None:
        return (have.domain, have.path) == (want.domain, want.path)
    return have.path == want.path or have.path.endswith("/" + want.path)
