"""``vigil replay``: operator tools that talk to NATS directly (placeholder, see #5)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``replay`` command to the ``vigil`` parser."""
    sub.add_parser("replay", help="operator replay of streams (timeline, stream, redrive, "
                   "rebuild)")
