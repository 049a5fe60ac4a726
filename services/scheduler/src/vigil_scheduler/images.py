"""Does an executor hold a task's image? Judged from the names it advertises.

A task is held back only when no advertised name can be the image, judged as leniently as
Podman resolves names (:func:`vigil.imagenames.matches`). Where the names cannot tell (a
digest or an image id; an executor that advertises none) the answer is yes, and the
executor's own check, which hands the task back, still decides. Executors advertise the
images pushed to the image store too (``vigil image push``): they load one on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

from vigil.imagenames import matches, parse
from vigil.messages import ANY_IMAGE

__all__ = ["holds", "parse"]


def holds(advertised: Sequence[str] | None, image: str) -> bool:
    """Whether a node advertising ``advertised`` (ExecutorInfo.images) may hold ``image``."""
    if advertised is None or ANY_IMAGE in advertised or image in advertised:
        return True
    if parse(image) is None:
        return True
    return any(matches(name, image) for name in advertised)
