"""How many threads torch should use here: the CPUs this process may run on, less what others
are using.

torch's CPU kernels split each operation over all its threads and wait for the slowest; when
another process holds one of the cores, every operation waits for a thread that is not
running, and the threads that finished spin meanwhile. Measured on 2 cores with another process
busy: a MiniLM training step took 10 s with 2 threads and 4.3 s with 1 (0.75 s on the idle
machine with 2). So the zoo uses ``CPUs - load`` threads (the 1-minute load average, rounded
to the nearest whole core, at least 1): an idle machine gets every core, a busy one costs only
its share. ``OMP_WAIT_POLICY=PASSIVE`` in the environment before Python starts (the demo
script sets it) also stops idle threads from spinning.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def free_cpus(load: float | None = None, cpus: int | None = None) -> int:
    """``cpus - load`` rounded to the nearest whole core, between 1 and ``cpus``."""
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average here
            load = 0.0
    return max(1, min(cpus, int(cpus - load + 0.5)))


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`free_cpus`); return it."""
    import torch

    from polymerge.errors import PolymergeError

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise PolymergeError(f"--threads must be a whole number >= 1, got {threads!r}")
    n = threads if threads else free_cpus()
    torch.set_num_threads(n)
    return n
