"""Run a command and measure its whole process tree: peak memory, CPU time, wall time.

Every 0.2 s the resident set sizes (RSS) of the process and all its descendants are summed
(psutil); the peak of that sum is the tree's peak RSS. Pages shared between processes (the
libraries every Ray worker maps, the object store) count once per process, so the sum is an
upper bound of the memory really used. Besides, ``wait4`` gives the exact peak RSS of the main
process alone (``ru_maxrss``), which for a single-process mode is its true peak.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

import psutil

INTERVAL_S = 0.2


@dataclass
class Usage:
    """What one measured command used."""

    returncode: int
    wall_s: float
    peak_tree_rss: int
    main_max_rss: int
    cpu_s: float
    max_processes: int
    load_before: float
    load_after: float


def measure(command: list[str], *, env: dict | None = None) -> Usage:
    """Run ``command`` to the end, sampling its process tree every 0.2 s."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    root = psutil.Process(process.pid)
    peak, largest, cpu = 0, 0, {}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        tree = _tree(root)
        peak = max(peak, _sample(tree, cpu))
        largest = max(largest, len(tree))
        time.sleep(INTERVAL_S)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Usage(
        returncode=process.returncode, wall_s=time.perf_counter() - started,
        peak_tree_rss=peak, main_max_rss=usage.ru_maxrss * 1024, cpu_s=sum(cpu.values()),
        max_processes=largest, load_before=load_before, load_after=os.getloadavg()[0],
    )


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _sample(tree: list[psutil.Process], cpu: dict[int, float]) -> int:
    """Sum of the tree's RSS; records each process's latest CPU seconds in ``cpu``."""
    total = 0
    for process in tree:
        try:
            with process.oneshot():
                total += process.memory_info().rss
                times = process.cpu_times()
                cpu[process.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return total
