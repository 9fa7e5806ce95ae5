"""What this machine lends a command: CPU cores and memory (standard library only, so that light commands
such as ``segpipe evaluate`` can ask without importing the heavy libraries)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from pathlib import Path

__all__ = ["available_memory", "process_pool", "usable_cores"]


def available_memory() -> int | None:
    """Bytes this process may still take: the smaller of the system's available memory and what is left under
    the container's (cgroup v2) limit; None when unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as a container or ``taskset`` sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_pool(workers: int) -> cf.ProcessPoolExecutor:
    """Worker processes for CPU work on files (``preprocess``, ``evaluate``): forked where the system can, so
    they start at once with the parent's modules; spawned elsewhere. (Inference spawns its own: its parent may
    hold a CUDA context, which a forked child must not inherit.)"""
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
