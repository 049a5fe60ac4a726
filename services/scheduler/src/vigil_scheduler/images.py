"""Does an executor hold a task's image? Judged from the names it advertises.

Podman resolves a reference leniently (a short name such as ``vigil-agent`` finds
``localhost/vigil-agent:latest``; a missing tag is ``latest``), so this judges as
leniently: a task is held back only when no advertised name can be the image. Where the
names cannot tell (a digest or an image id; an executor that advertises none) the answer
is yes, and the executor's own check, which hands the task back, still decides.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

from vigil.messages import ANY_IMAGE

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


def holds(advertised: Sequence[str] | None, image: str) -> bool:
    """Whether a node advertising ``advertised`` (ExecutorInfo.images) may hold ``image``."""
    if advertised is None or ANY_IMAGE in advertised or image in advertised:
        return True
    want = parse(image)
    if want is None:
        return True
    for name in advertised:
        have = parse(name)
        if have is None or have.tag != want.tag:
            continue
        if want.domain is not None:
            if (have.domain, have.path) == (want.domain, want.path):
                return True
        elif have.path == want.path or have.path.endswith("/" + want.path):
            return True
    return False
