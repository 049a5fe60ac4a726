"""A submission that names a persistent environment takes its defaults from it.

Admission is pure (:mod:`vigil_scheduler.admission`), so the environment is read before
it: :func:`lookup` peeks at the submission for the name and reads the environment (one KV
get, only for submissions that name one), and :func:`apply` fills the task's image,
egress and secrets from it, or refuses a name the tenant has no environment of.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from vigil import ids
from vigil.environments import Environment, EnvironmentStore, with_defaults
from vigil.messages import TaskSpec

Found = Mapping[str, Environment]
"""The environments a submission may name, by name, as :func:`lookup` read them."""


class _Named(msgspec.Struct):
    environment: object = None


_peek = msgspec.json.Decoder(_Named)


def named(data: bytes) -> str | None:
    """The environment a submission names, if it is a valid name (an invalid spec is
    admission's to refuse, with the field)."""
    try:
        name = _peek.decode(data).environment
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return name if isinstance(name, str) and ids.is_valid_id(name) else None


async def lookup(store: EnvironmentStore, tenant: str | None, data: bytes) -> Found:
    """The environment the submission names ({} when it names none, or none exists)."""
    name = named(data)
    if tenant is None or name is None:
        return {}
    got = await store.get(tenant, name)
    return {name: got[0]} if got is not None else {}


def apply(spec: TaskSpec, tenant: str, found: Found) -> TaskSpec | str:
    """``spec`` with its environment's defaults, or why it cannot be admitted."""
    if spec.environment is None:
        return spec
    env = found.get(spec.environment)
    if env is None:
        return (f"invalid task spec: tenant {tenant} has no environment "
                f"{spec.environment!r}; create it first (`vigil env create "
                f"{spec.environment} --image IMAGE`) (at $.environment)")
    return with_defaults(spec, env)
