"""Placement by image: which advertised names may be a task's image (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vigil.messages import ANY_IMAGE, ExecutorInfo
from vigil_scheduler.fleet import Fleet
from vigil_scheduler.images import holds

pytestmark = pytest.mark.unit

AGENT = ["localhost/vigil-agent:latest", "localhost/vigil-agent:d330610737fc5fb8",
         "docker.io/library/busybox:1.36", "quay.io/acme/tool:2"]


@pytest.mark.parametrize(("image", "held"), [
    ("localhost/vigil-agent:latest", True),
    ("localhost/vigil-agent", True),  # no tag is :latest
    ("vigil-agent", True),  # a short name: Podman finds it in local storage
    ("vigil-agent:d330610737fc5fb8", True),
    ("busybox:1.36", True),
    ("docker.io/busybox:1.36", True),  # Docker Hub's implied library/
    ("library/busybox:1.36", True),
    ("tool:2", True),
    ("acme/tool:2", True),
    ("localhost/vigil-agent:1", False),  # the wrong tag
    ("busybox", False),  # :latest, which is not here
    ("localhost/does-not-exist:1", False),
    ("quay.io/other/tool:2", False),  # a full name must match in full
    ("example.com/vigil-agent:latest", False),
    # Names cannot judge a digest or an image id: the executor's own check decides.
    ("localhost/vigil-agent@sha256:" + "a" * 64, True),
    ("8a55ca96da71", True),
])
def test_holds_judges_as_leniently_as_podman_resolves(image: str, held: bool) -> None:
    assert holds(AGENT, image) is held


def test_unknown_or_any_image_holds_everything() -> None:
    assert holds(None, "localhost/anything:1")
    assert holds([ANY_IMAGE], "localhost/anything:1")
    assert not holds([], "localhost/anything:1")


def _info(node: str, pool: str = "default", images: list[str] | None = None,
          labels: dict[str, str] | None = None) -> ExecutorInfo:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return ExecutorInfo(node=node, pool=pool, slots=2, labels=labels or {}, images=images,
                        started_at=now, seen_at=now)


def fleet(*infos: ExecutorInfo) -> Fleet:
    f = Fleet(js=None)  # type: ignore[arg-type]  # live() never touches NATS
    for info in infos:
        f._nodes[info.node] = (info, float("inf"))
    return f


def test_unservable_says_what_no_executor_has() -> None:
    f = fleet(_info("a", images=AGENT), _info("b", images=["localhost/other:1"],
                                               labels={"gpu": "a100"}))
    assert f.unservable("default", {}, "localhost/vigil-agent:latest") is None
    assert f.unservable("gpu", {}, None) == "no live executor serves pool 'gpu'"
    assert f.unservable("default", {"gpu": "h100"}, "x") == (
        "no live executor serves pool 'default' with labels {'gpu': 'h100'}")
    assert f.unservable("default", {}, "localhost/nope:1") == (
        "no live executor of pool 'default' has image 'localhost/nope:1'")
    # The labelled node has other images: the image is what is missing, for those labels.
    assert f.unservable("default", {"gpu": "a100"}, "localhost/vigil-agent:latest") == (
        "no live executor of pool 'default' with labels {'gpu': 'a100'} has image "
        "'localhost/vigil-agent:latest'")
    assert fleet(_info("old")).unservable("default", {}, "localhost/nope:1") is None
