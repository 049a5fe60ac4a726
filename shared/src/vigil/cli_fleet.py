"""``vigil executors``: the fleet as the gateway sees it in the ``vigil-executors`` registry.

Each executor advertises its pool, labels, slots and running count every few seconds; an
entry not refreshed within the registry's TTL (15 s) has expired, so what is listed is
alive as of its SEEN age. A draining node (SIGTERM: handing its work back) offers no
free slots and is marked as such until it withdraws its entry.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from vigil.api import ExecutorList, ExecutorView
from vigil.cli_config import add_client_flags, open_client
from vigil.cli_output import (
    EXIT_OK,
    EXIT_USAGE,
    age,
    exit_epilog,
    labels_text,
    out_json,
    table,
    terminal_width,
    wants_color,
)

# An entry is refreshed every VIGIL_ADVERTISE_S (at most 5 s): older than this, the node
# has missed at least one refresh and is on its way to expiring.
STALE_S = 10.0


def pools(values: list[str] | None) -> list[str]:
    """``--pool`` values, repeated and/or comma-separated."""
    out: list[str] = []
    for value in values or []:
        for item in filter(None, (v.strip() for v in value.split(","))):
            if item not in out:
                out.append(item)
    return out


def select(executors: Sequence[ExecutorView], wanted: Sequence[str]) -> list[ExecutorView]:
    """The executors in any of the ``wanted`` pools (all of them when none is wanted)."""
    return [e for e in executors if not wanted or e.pool in wanted]


def state_of(e: ExecutorView) -> str:
    if e.draining:
        return "draining"
    return "full" if e.free <= 0 else "ready"


def render_executors(executors: Sequence[ExecutorView], *, color: bool = False,
                     width: int | None = None, now: datetime | None = None) -> list[str]:
    """The ``vigil executors`` table."""
    headers = ("NODE", "POOL", "SLOTS", "RUNNING", "FREE", "STATE", "RUNTIME", "SEEN",
               "LABELS")
    rows, colors = [], []
    for e in executors:
        state = state_of(e)
        stale = now is not None and (now - e.seen_at).total_seconds() > STALE_S
        rows.append((e.node, e.pool, str(e.slots), str(e.running), str(e.free), state,
                     e.runtime, age(e.seen_at, now),
                     labels_text(e.labels) or "-"))
        colors.append(("", "", "", "", "32" if e.free > 0 else "2",
                       {"draining": "33", "full": "2"}.get(state, ""),
                       "31" if e.runtime != "podman" else "",  # an unsafe runtime
                       "33" if stale else "", "2"))
    return table(headers, rows, colors=colors, color=color, width=width,
                 right=frozenset({2, 3, 4, 7}))


def totals(executors: Sequence[ExecutorView]) -> str:
    """``3 executors in 2 pools: 12 slots, 5 running, 7 free (1 draining)``."""
    n = len(executors)
    pool_count = len({e.pool for e in executors})
    draining = sum(e.draining for e in executors)
    text = (f"{n} executor{'s' * (n != 1)} in {pool_count} pool{'s' * (pool_count != 1)}: "
            f"{sum(e.slots for e in executors)} slots, "
            f"{sum(e.running for e in executors)} running, "
            f"{sum(e.free for e in executors)} free")
    return text + (f" ({draining} draining)" if draining else "")


async def cmd_executors(args: argparse.Namespace) -> int:
    wanted = pools(args.pool)
    async with open_client(args) as client:
        fleet = await client.executors()
    found = select(fleet.executors, wanted)
    if args.json:
        print(out_json(ExecutorList(executors=found)))
        return EXIT_OK
    if not found:
        where = f" in pool {', '.join(wanted)}" if wanted else ""
        print(f"no executors{where} are advertising (an executor appears here within a few "
              "seconds of starting; check its log and VIGIL_POOL)", file=sys.stderr)
        return EXIT_OK
    out = sys.stdout
    for line in render_executors(found, color=wants_color(out), width=terminal_width(out),
                                 now=datetime.now(UTC)):
        print(line)
    print(totals(found), file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``executors`` to the ``vigil`` parser."""
    ex = sub.add_parser(
        "executors", help="list live executors: pool, slots, free, labels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the executors advertising in the registry, by pool then node:\n"
        "NODE, POOL, SLOTS, RUNNING, FREE, STATE (ready, full, draining), RUNTIME,\n"
        "SEEN (time since its last refresh) and LABELS. An executor that stops refreshing\n"
        "drops out after 15 s. Totals go to stderr, so the table can be piped.",
        epilog="""examples:
  vigil executors
  vigil executors --pool gpu
  vigil executors --json | jq '[.executors[].free] | add'

--json prints the API's own shape: {"executors": [{node, pool, labels, slots, running,
  free, draining, runtime, version, started_at, seen_at, tenants}, ...]}.

""" + exit_epilog((EXIT_OK, "listed (also when none are)"),
                  (EXIT_USAGE, "refused (a viewer token is needed)")))
    ex.add_argument("--pool", action="append", metavar="POOL[,POOL…]",
                    help="only executors of these pools (repeat or comma-separate)")
    ex.add_argument("--json", action="store_true", help="print JSON (see below)")
    add_client_flags(ex)
    ex.set_defaults(func=cmd_executors)

