"""``vigil-scheduler``: admits submissions and records task state."""

from __future__ import annotations

from vigil import runner
from vigil_scheduler.service import Scheduler
from vigil_scheduler.settings import SchedulerSettings


def main() -> None:
    runner.main("vigil-scheduler", SchedulerSettings, Scheduler)


if __name__ == "__main__":
    main()
