"""Write docs/state-machine.md from vigil.transitions.EDGES (a test checks it is current).

    .venv/bin/python scripts/gen_state_machine_doc.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from vigil import transitions

DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machine.md"


def render() -> str:
    labels: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    for name, frm, to in transitions.EDGES:
        labels[(frm, to)].append(name)
    lines = [
        "# The task state machine",
        "",
        "Generated from `vigil.transitions.EDGES` by `scripts/gen_state_machine_doc.py`;",
        "the rules (what an attempt costs, when a task is dead, who may write) are in the",
        "module's docstring. Every service moves a task only through these transitions.",
        "",
        "```mermaid",
        "stateDiagram-v2",
        "    [*] --> queued: admit",
    ]
    for (frm, to), names in labels.items():
        if frm == "new":
            continue
        lines.append(f"    {frm} --> {to}: {', '.join(names)}")
    lines += [f"    {end} --> [*]" for end in ("succeeded", "failed", "timed_out",
                                                "cancelled", "dead")]
    lines += ["```", "", "| transition | from | to |", "|---|---|---|"]
    lines += [f"| {name} | {frm} | {to} |" for name, frm, to in transitions.EDGES]
    return "\n".join(lines) + "\n"


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
