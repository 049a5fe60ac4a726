"""``vigil-executor``: runs agents in rootless Podman containers."""

from __future__ import annotations

from vigil import runner
from vigil_executor.service import Executor
from vigil_executor.settings import ExecutorSettings


def main() -> None:
    runner.main("vigil-executor", ExecutorSettings, Executor)


if __name__ == "__main__":
    main()
