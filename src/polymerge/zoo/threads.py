"""How many threads torch should use here: the CPUs this process may run on, less what others
are using right now.

torch's CPU kernels split each operation over all its threads and wait for the slowest; when
another process holds one of the cores, every operation waits for a thread that is not
running, and the threads that finished spin meanwhile. Measured on 2 cores with another process
busy: a MiniLM training step took 10 s with 2 threads and 4.3 s with 1 (0.75 s on the idle
machine with 2). So the zoo uses ``CPUs - busy`` threads, where ``busy`` is the cores other
processes kept busy over the last quarter second (from ``/proc/stat``, less this process's own
use), rounded to the nearest whole core, at least 1. The 1-minute load average is only the
fallback where ``/proc/stat`` is missing: it lags by a minute, so right after ``pip install``
it still reads 1 on an idle machine (the cold demo trained its experts on one thread of two
because of that). The count is measured again before each expert is trained, unless the user
fixed it with ``--threads``. ``OMP_WAIT_POLICY=PASSIVE`` in the environment before Python
starts (the demo script sets it) also stops idle threads from spinning.
"""

from __future__ import annotations

import os
import time

SAMPLE_SECONDS = 0.25

_fixed: int | None = None  # --threads, when the user gave it


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, total) clock ticks of the whole machine from ``/proc/stat``, and this process's
    own CPU ticks; None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    own = os.times()
    ticks = os.sysconf("SC_CLK_TCK")
    return total - idle, total, round((own.user + own.system) * ticks)


def busy_between(before: tuple[int, int, int], after: tuple[int, int, int], cpus: int
                 ) -> float:
    """Cores that *other* processes kept busy between two :func:`_cpu_ticks` readings."""
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    if total <= 0:
        return 0.0
    # ``total`` counts ticks of every core of the machine; this process may see fewer of them.
    machine_cpus = os.cpu_count() or cpus
    return max(0.0, (busy - own) / total * machine_cpus)


def busy_cpus(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores other processes use now: sampled over ``seconds``, or the 1-minute load average
    where ``/proc/stat`` is missing."""
    before = _cpu_ticks()
    if before is not None:
        time.sleep(seconds)
        after = _cpu_ticks()
        if after is not None:
            return busy_between(before, after, available_cpus())
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average here
        return 0.0


def free_cpus(load: float | None = None, cpus: int | None = None) -> int:
    """``cpus - load`` rounded to the nearest whole core, between 1 and ``cpus``; ``load``
    defaults to :func:`busy_cpus`."""
    cpus = available_cpus() if cpus is None else cpus
    load = busy_cpus() if load is None else load
    return max(1, min(cpus, int(cpus - load + 0.5)))


def use_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (fixed from then on) or, without it, to
    :func:`free_cpus`; return the count."""
    global _fixed
    from polymerge.errors import PolymergeError

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise PolymergeError(f"--threads must be a whole number >= 1, got {threads!r}")
    _fixed = threads or None
    return refresh_threads()


def refresh_threads() -> int:
    """Measure the free cores again (unless the user fixed the count) and set torch's threads;
    called before each long step, such as training one expert."""
    import torch

    n = _fixed or free_cpus()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
