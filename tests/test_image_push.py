"""Images reach every executor: ``vigil image push`` stores an image archive once, and an
executor that lacks a task's image loads it from there on first use, with progress in the
task's events, checked (size, digest, id) before anything runs.

Real rootless Podman and NATS as shipped. Each test makes a fresh image (the agent image
with an ``ENV`` of its own, so a new image id), pushes it with the real ``vigil`` command
as the operator's NATS user, and ``podman rmi``s it: the node has never had it as far
as the task can tell.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import ObjectMeta

from support import CliResult, Platform, as_user, podman_argv, run_vigil, session_node_id
from vigil import subjects
from vigil.embedded import PodmanService
from vigil.imagestore import PushedImage, pushed_images

pytestmark = [pytest.mark.integration, pytest.mark.podman]

PRINT_PROBE = "import os; print('probe', os.environ['PUSH_PROBE'], flush=True)"


def cli(*args: str, binary: bool = False) -> Any:
    done = subprocess.run([*podman_argv(), *args], capture_output=True, check=False,
                          timeout=120, text=not binary)
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def image_exists(name: str) -> bool:
    return subprocess.run([*podman_argv(), "image", "exists", name], check=False,
                          timeout=60).returncode == 0


@pytest.fixture
def fresh_image(agent_image: str) -> Iterator[tuple[str, str]]:
    """(name, probe): a new image (the agent image, committed with ``PUSH_PROBE=probe``)
    under a name of its own; removed from the node at the end."""
    probe = secrets.token_hex(6)
    name = f"localhost/vigil-push-{probe}:t1"
    container = cli("create", "--label", "dev.vigil.test=push", agent_image,
                       "true").strip()
    try:
        cli("commit", "-q", "--change", f"ENV PUSH_PROBE={probe}", container, name)
    finally:
        cli("rm", "-f", container)
    try:
        yield name, probe
    finally:
        subprocess.run([*podman_argv(), "rmi", "-f", name], capture_output=True,
                       check=False, timeout=60)


async def push(home: Path, platform: Platform, *argv: str) -> CliResult:
    return await run_vigil(home, "", "", "image", "push", *argv, timeout=300,
                           VIGIL_NATS_URL=as_user(platform.url, "operator"))


def loads(platform: Platform, task_id: str) -> list[dict[str, Any]]:
    return [e["data"]["image_load"] for e in platform.events.of(task_id, "progress")
            if "image_load" in e["data"]]


def lines(platform: Platform, task_id: str) -> list[str]:
    return [ln for e in platform.events.of(task_id, "log") for ln in e["lines"]]


async def executor(platform: Platform, podman_service: PodmanService, **extra: Any) -> Any:
    await platform.scheduler(unservable_after_s=0)
    return await platform.executor(runtime="podman", unsafe_runtime=False,
                                   podman_url=podman_service.url, stop_grace_s=1, slots=2,
                                   node_id=session_node_id(), **extra)


async def test_an_image_pushed_once_runs_on_an_executor_that_never_had_it(
    platform: Platform, podman: PodmanService, fresh_image: tuple[str, str], tmp_path: Path
) -> None:
    name, probe = fresh_image
    image_id = cli("image", "inspect", "--format", "{{.Id}}", name).strip()
    pushed = await push(tmp_path, platform, name)
    assert pushed.code == 0, pushed.err
    assert pushed.out.startswith(f"pushed {name} ({image_id[:12]}): "), pushed.out
    assert "upload MiB" in pushed.err  # the progress bar
    (stored,) = [p for p in await pushed_images(platform.js) if p.name == name]
    assert stored.image_id == image_id and stored.digest.startswith("sha256:")
    again = await push(tmp_path, platform, name)  # the same archive: nothing uploaded
    assert again.code == 0 and "is pushed already" in again.out, again
    cli("rmi", name)
    assert not image_exists(name)

    await executor(platform, podman)
    # Two tasks at once on the one node: the image is loaded once.
    for task_id in ("img-1", "img-2"):
        await platform.publish_spec({"id": task_id, "image": name,
                                     "command": ["python3", "-c", PRINT_PROBE]})
    first = [await platform.final_state(t, timeout=120) for t in ("img-1", "img-2")]
    assert [s.status for s in first] == ["succeeded", "succeeded"], [s.error for s in first]
    assert all(f"probe {probe}" in lines(platform, t) for t in ("img-1", "img-2"))
    loaded = {t: loads(platform, t) for t in ("img-1", "img-2")}
    (loader,) = [t for t, steps in loaded.items() if steps]
    steps = loaded[loader]
    assert steps[0]["step"] == "downloading" and steps[0]["bytes"] == 0
    assert [s["step"] for s in steps[-2:]] == ["loading", "loaded"]
    assert steps[-1]["bytes"] == steps[-1]["total"] == stored.size
    assert steps[-1]["percent"] == 100.0 and steps[-1]["seconds"] > 0
    assert {s["image"] for s in steps} == {name}
    assert image_exists(name)
    # Once loaded, a later task just runs.
    await platform.publish_spec({"id": "img-3", "image": name,
                                 "command": ["python3", "-c", PRINT_PROBE]})
    third = await platform.final_state("img-3", timeout=60)
    assert third.status == "succeeded" and loads(platform, "img-3") == []
    assert [h.outcome for s in (*first, third) for h in s.history] == ["succeeded"] * 3


async def test_an_image_over_the_limit_is_refused_before_a_byte_moves(
    platform: Platform, podman: PodmanService, fresh_image: tuple[str, str], tmp_path: Path
) -> None:
    name, _ = fresh_image
    refused = await push(tmp_path, platform, name, "--max-mb", "1")
    assert refused.code == 2
    assert f"image {name} is too large to push: podman reports " in refused.err
    assert "over the limit of 1 MiB" in refused.err and "nothing was uploaded" in refused.err
    assert await pushed_images(platform.js) == []
    # Pushed under a generous limit, it is still over this executor's.
    assert (await push(tmp_path, platform, name)).code == 0
    cli("rmi", name)
    await executor(platform, podman, image_max_mb=1)
    await platform.publish_spec({"id": "big", "image": name, "command": ["true"]})
    state = await platform.final_state("big", timeout=60)
    assert state.status == "failed" and [h.outcome for h in state.history] == ["failed"]
    assert state.error is not None and "over this executor's limit of 1 MiB" in state.error
    assert loads(platform, "big") == []  # nothing was downloaded
    (told,) = await platform.confessions("image_too_large")
    assert told["task_id"] == "big"
    assert not image_exists(name)
    removed = await run_vigil(tmp_path, "", "", "image", "rm", name,
                              VIGIL_NATS_URL=as_user(platform.url, "operator"))
    assert removed.code == 0 and removed.out.startswith(f"removed {name} "), removed
    assert await pushed_images(platform.js) == []


async def test_an_archive_that_is_not_what_was_pushed_never_runs(
    platform: Platform, podman: PodmanService, fresh_image: tuple[str, str]
) -> None:
    """Its bytes changed in the store (the recorded digest kept): refused after the
    download. Its bytes intact but recorded as another image: refused before Podman loads
    it. Neither runs, nothing is loaded; both are critical confessions."""
    name, _ = fresh_image
    image_id = cli("image", "inspect", "--format", "{{.Id}}", name).strip()
    archive = cli("save", "--format", "docker-archive", name, binary=True)
    cli("rmi", name)
    store = await platform.js.object_store(subjects.OBJ_IMAGES)
    digest = f"sha256:{hashlib.sha256(archive).hexdigest()}"
    swapped = "localhost/vigil-swapped:1"
    liar = "localhost/vigil-liar:1"
    recorded = PushedImage(name=swapped, image_id="a" * 64, size=len(archive), digest=digest)
    middle = len(archive) // 2
    tampered = archive[:middle] + bytes([archive[middle] ^ 0xFF]) + archive[middle + 1:]
    await store.put(swapped, tampered, meta=ObjectMeta(name=swapped,
                                                      headers=recorded.headers()))
    other = PushedImage(name=liar, image_id="b" * 64, size=len(archive), digest=digest)
    await store.put(liar, archive, meta=ObjectMeta(name=liar, headers=other.headers()))
    await executor(platform, podman)
    for task_id, image in (("swapped", swapped), ("liar", liar)):
        await platform.publish_spec({"id": task_id, "image": image, "command": ["true"]})
    swapped_state = await platform.final_state("swapped", timeout=120)
    liar_state = await platform.final_state("liar", timeout=120)
    assert swapped_state.status == "failed" and platform.events.of("swapped", "started") == []
    assert swapped_state.error is not None and (
        f"image {swapped} from the image store is not the archive that was pushed"
        in swapped_state.error)
    assert liar_state.status == "failed" and platform.events.of("liar", "started") == []
    assert liar_state.error == (
        f"image {liar} from the image store: it holds image {image_id[:12]}, not the "
        "recorded bbbbbbbbbbbb; it was not loaded")
    told = {c["task_id"]: c for c in await platform.confessions("image_tampered")}
    assert set(told) == {"swapped", "liar"}
    assert {c["severity"] for c in told.values()} == {"critical"}
    assert not image_exists(swapped) and not image_exists(liar) and not image_exists(name)
