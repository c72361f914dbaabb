"""Compute threads that follow the cores other processes leave free.

PyTorch's OpenMP threads split every op into equal static parts and wait for each other at its
end, spinning meanwhile (fast on a quiet machine). When another process holds a core, the thread
sharing that core finishes last on every op and the other spins waiting for it: measured here on
2 cores with a busy loop on one, 2 threads decoded 16 sequences at 44 tokens/s against 174 quiet
(4x slower), while 1 thread decoded at 125 quiet or busy. Passive waits (OMP_WAIT_POLICY) fix
contention but cost 35-50% on a quiet machine, and no spin count was good at both.

So the engine measures, at most once per `interval_s`, how much CPU the rest of the machine used
(all cores' busy time from /proc/stat, less this process's own from /proc/self/stat; stolen
time is not counted, as it is the hypervisor's) and sets the thread count to the cores left,
rounded with a margin, between 1 and the count it started with. vLLM binds one thread per core
for the same reason; binding alone does not stop the waiting.
"""

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DEFAULT_INTERVAL_S = 1.0
STALE_WINDOWS = 3  # a measurement spanning more than 3 intervals only starts a new window
FREE_CORE_MARGIN = 0.5  # a core counts as free when others leave at least half of it


def _machine_busy_ticks() -> int | None:
    """Busy ticks of all cores since boot (user, nice, system, irq, softirq), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return user + nice + system + irq + softirq


def _own_ticks() -> int | None:
    """CPU ticks this process used (user + system), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave free."""

    def __init__(self, max_threads: int | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 cores: int | None = None, machine_ticks=_machine_busy_ticks, own_ticks=_own_ticks,
                 clock=time.monotonic) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval_s = interval_s
        self.threads = self.max_threads
        self.cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self._machine_ticks, self._own_ticks, self._clock = machine_ticks, own_ticks, clock
        self._last = (clock(), machine_ticks(), own_ticks())
        self.enabled = self.max_threads > 1 and None not in self._last
        self.others_cores = 0.0  # last measurement: cores' worth of CPU used by other processes

    def threads_for(self, others_cores: float) -> int:
        """Threads to run with when other processes use `others_cores` cores."""
        free = self.cores - others_cores + FREE_CORE_MARGIN
        return max(1, min(self.max_threads, int(free)))

    def maybe_adjust(self) -> int:
        """Measure (at most once per interval) and set the thread count; return it. Cheap: two
        small reads of /proc."""
        if not self.enabled:
            return self.threads
        now = self._clock()
        last_s, last_busy, last_own = self._last
        if now - last_s < self.interval_s:
            return self.threads
        busy, own = self._machine_ticks(), self._own_ticks()
        self._last = (now, busy, own)
        if now - last_s > STALE_WINDOWS * self.interval_s:
            return self.threads  # the engine was idle (or stopped): what others did meanwhile says nothing now
        elapsed_ticks = (now - last_s) * CLOCK_TICKS_PER_S
        self.others_cores = max(0.0, (busy - last_busy) - (own - last_own)) / elapsed_ticks
        wanted = self.threads_for(self.others_cores)
        if wanted != self.threads:
            logger.info("other processes used %.2f of %d cores: %d compute threads", self.others_cores,
                        self.cores, wanted)
            torch.set_num_threads(wanted)
            self.threads = wanted
        return self.threads
