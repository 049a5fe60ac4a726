"""Who goes next: fair shares across tenants, priority within a tenant. Pure functions.

The policy (also in the README):

- Tenants with queued work in a pool take turns, one task per turn (round-robin), in a
  rotating order that continues where the previous dispatch round stopped. A tenant with
  10,000 queued tasks and one with 10 get equal turns while both have work, so the small
  tenant's tasks start after at most (number of tenants) dispatches each.
- Within a tenant, the highest ``priority`` (9 … 0) goes first; equal priorities in
  submission order (the queue subject is FIFO).
- A tenant at its running limit sits its turns out until its tasks finish.
- Only as many tasks are released as the pool has free slots, so the order above holds
  however large the backlog is: nothing waits in the executors' work queue unfairly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Depths = Mapping[str, Mapping[int, int]]  # tenant -> priority -> queued tasks


@dataclass(frozen=True)
class Pick:
    tenant: str
    priority: int
    count: int


def plan(depths: Depths, capacity: int, running: Mapping[str, int],
         max_running: Mapping[str, int], after: str | None) -> tuple[list[Pick], str | None]:
    """Choose up to ``capacity`` tasks; return them grouped per (tenant, priority), in
    dispatch order, and the tenant the next round should start after."""
    tenants = sorted(t for t, by_prio in depths.items() if any(n > 0 for n in by_prio.values()))
    if not tenants or capacity <= 0:
        return [], after
    if after is not None:
        # Continue the rotation: first the tenants sorting after the last one served.
        tenants = [t for t in tenants if t > after] + [t for t in tenants if t <= after]
    left = {t: dict(depths[t]) for t in tenants}
    budget = {t: max(0, max_running.get(t, 1 << 30) - running.get(t, 0)) for t in tenants}
    counts: dict[tuple[str, int], int] = {}
    order: list[tuple[str, int]] = []
    last = after
    while capacity > 0:
        progressed = False
        for tenant in tenants:
            if capacity == 0:
                break
            if budget[tenant] == 0:
                continue
            prios = [p for p, n in left[tenant].items() if n > 0]
            if not prios:
                continue
            prio = max(prios)
            left[tenant][prio] -= 1
            budget[tenant] -= 1
            capacity -= 1
            key = (tenant, prio)
            if key not in counts:
                order.append(key)
            counts[key] = counts.get(key, 0) + 1
            last = tenant
            progressed = True
        if not progressed:
            break
    return [Pick(t, p, counts[(t, p)]) for t, p in order], last
