"""``vigil-auditor``: records (and later triages) confessions."""

from __future__ import annotations

from vigil import runner
from vigil_auditor.service import Auditor
from vigil_auditor.settings import AuditorSettings


def main() -> None:
    runner.main("vigil-auditor", AuditorSettings, Auditor)


if __name__ == "__main__":
    main()
