"""Unit tests: the ``vigil executors`` table, its pool filter, totals and help."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vigil import cli, cli_fleet
from vigil.api import ExecutorView

pytestmark = pytest.mark.unit

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ANSI = re.compile(r"\033\[[0-9;]*m")


def view(node: str, pool: str = "default", *, slots: int = 4, running: int = 0,
         seen_s: float = 1.0, **fields: Any) -> ExecutorView:
    free = 0 if fields.get("draining") else max(0, slots - running)
    fields.setdefault("runtime", "podman")
    return ExecutorView(node=node, pool=pool, slots=slots, running=running, free=free,
                        started_at=NOW - timedelta(hours=2),
                        seen_at=NOW - timedelta(seconds=seen_s), **fields)


FLEET = [
    view("node-a", running=1, labels={"zone": "eu", "disk": "ssd"}),
    view("node-b", running=4, seen_s=3),
    view("node-c", running=2, draining=True, seen_s=12),
    view("gpu-1", "gpu", slots=1, runtime="process", labels={"gpu": "a100"}),
]


def test_executors_table() -> None:
    assert cli_fleet.render_executors(FLEET, now=NOW) == [
        "NODE    POOL     SLOTS  RUNNING  FREE  STATE     RUNTIME  SEEN  LABELS",
        "node-a  default      4        1     3  ready     podman     1s  disk=ssd,zone=eu",
        "node-b  default      4        4     0  full      podman     3s  -",
        "node-c  default      4        2     0  draining  podman    12s  -",
        "gpu-1   gpu          1        0     1  ready     process    1s  gpu=a100",
    ]


def test_coloured_table_stays_aligned_and_marks_what_matters() -> None:
    plain = cli_fleet.render_executors(FLEET, now=NOW)
    coloured = cli_fleet.render_executors(FLEET, color=True, now=NOW)
    assert [ANSI.sub("", line) for line in coloured] == plain
    assert "\033[33mdraining" in coloured[3]
    assert "\033[33m 12s" in coloured[3]  # missed refreshes: about to expire
    assert "\033[33m" not in coloured[1].split("ready")[1]  # a fresh entry is not marked
    assert "\033[31mprocess" in coloured[4]  # an unsandboxed runtime stands out


def test_labels_are_cut_to_the_terminal() -> None:
    wide = [view("n", labels={f"k{i}": "v" * 10 for i in range(10)})]
    line = cli_fleet.render_executors(wide, width=80, now=NOW)[1]
    assert len(line) == 80 and line.endswith("…")


def test_pool_filter_repeats_and_commas() -> None:
    assert cli_fleet.pools(None) == []
    assert cli_fleet.pools(["gpu,default", "gpu", " cpu "]) == ["gpu", "default", "cpu"]
    assert [e.node for e in cli_fleet.select(FLEET, ["gpu"])] == ["gpu-1"]
    assert len(cli_fleet.select(FLEET, [])) == 4
    assert cli_fleet.select(FLEET, ["nowhere"]) == []


def test_totals() -> None:
    assert cli_fleet.totals(FLEET) == ("4 executors in 2 pools: 13 slots, 7 running, 4 free "
                                       "(1 draining)")
    assert cli_fleet.totals(FLEET[:1]) == "1 executor in 1 pool: 4 slots, 1 running, 3 free"


def test_help_has_examples_and_parses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["executors", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: vigil executors" in text and "examples:" in text and "--pool" in text
    args = cli.build_parser().parse_args(["executors", "--pool", "gpu", "--json"])
    assert args.func is cli_fleet.cmd_executors and args.pool == ["gpu"] and args.json
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "executors" in capsys.readouterr().out
