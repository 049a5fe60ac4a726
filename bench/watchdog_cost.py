"""What one watchdog sample costs (vigil_executor.watchdog): the processes read through a
procfs (here the host's own, with N sleeping children of this program: the same reads as
a container's) and a workspace of M files walked. Prints a table; run as root or as the
rootless Podman user: ``.venv/bin/python bench/watchdog_cost.py``."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from vigil_executor.watchdog import processes, tree_bytes


def timed(fn: object, runs: int = 30) -> tuple[float, float]:
    costs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        costs.append(time.perf_counter() - t0)
    return statistics.median(costs) * 1e3, max(costs) * 1e3


def main() -> None:
    n_procs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    n_files = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    base = sum(1 for e in os.scandir(proc_fd) if e.name.isdigit())
    children = [subprocess.Popen(["sleep", "600"]) for _ in range(n_procs)]
    try:
        with tempfile.TemporaryDirectory() as root:
            for i in range(n_files):
                d = os.path.join(root, f"d{i // 100}")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"f{i}"), "wb") as f:
                    f.write(b"x" * 100)
            print(f"{'measure':<44} {'median ms':>10} {'max ms':>8}")
            med, top = timed(lambda: processes(proc_fd))
            print(f"{f'procfs, {base + n_procs} processes (PSS, threads)':<44} "
                  f"{med:>10.2f} {top:>8.2f}")
            med, top = timed(lambda: tree_bytes(root))
            print(f"{f'workspace walk, {n_files} files in {n_files // 100} dirs':<44} "
                  f"{med:>10.2f} {top:>8.2f}")
    finally:
        for c in children:
            c.kill()
            c.wait()
        os.close(proc_fd)


if __name__ == "__main__":
    main()
