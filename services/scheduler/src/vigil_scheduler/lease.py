"""A leader lease in ``vigil-leases``: one scheduler dispatches at a time.

Whoever creates the key holds it and renews it (compare-and-set on its revision) well
inside the bucket's TTL. A holder killed with kill -9 stops renewing; the key expires
and a standby's create succeeds. Two holders at once can only happen across a pause
longer than the TTL, and dispatch stays safe then (every step is a compare-and-set),
only briefly less exact in capacity.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from vigil import subjects, topology

log = structlog.get_logger("vigil.scheduler")


class Lease:
    def __init__(self, js: JetStreamContext, name: str, holder: str) -> None:
        self.js = js
        self.name = name
        self.holder = f"{holder}/{uuid.uuid4().hex[:8]}"
        self.ttl_s = topology.LEASES.ttl_s
        self._kv: KeyValue | None = None
        self._revision = 0
        self._renewed = 0.0
        self._complained = -1e9

    @property
    def held(self) -> bool:
        return self._revision > 0 and time.monotonic() - self._renewed < self.ttl_s * 0.8

    async def hold(self) -> bool:
        """Take or renew the lease; True while this process holds it."""
        if self._kv is None:
            self._kv = await self.js.key_value(subjects.KV_LEASES)
        now = time.monotonic()
        if self._revision and now - self._renewed < self.ttl_s / 5:
            return True
        try:
            if self._revision:
                self._revision = await self._kv.update(self.name, self.holder.encode(),
                                                       last=self._revision)
            else:
                self._revision = await self._kv.create(self.name, self.holder.encode())
            self._renewed = now
            return True
        except (KeyWrongLastSequenceError, NotFoundError):
            self._revision = 0
            return False
        except Exception as exc:
            # NATS away, or worse (rights, a broken bucket): treat as lost (the TTL hands
            # it over anyway), and say so, at most every half minute.
            self._revision = 0
            if now - self._complained > 30:
                self._complained = now
                log.warning("lease_error", lease=self.name, error=str(exc) or repr(exc))
            return False

    async def release(self) -> None:
        if self._kv is not None and self._revision:
            with contextlib.suppress(Exception):  # expiry releases it anyway
                await self._kv.delete(self.name, last=self._revision)
            self._revision = 0
