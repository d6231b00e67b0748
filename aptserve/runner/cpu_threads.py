"""How many torch threads a CPU step runs on: the cores the rest of the machine leaves free, at most torch's count.

OpenMP threads meet at a barrier after every parallel region (hundreds per forward pass). When another busy
process shares a core with one of them, each region waits for that thread's next time slice: measured on 2 cores
with a client hogging one, a 24 ms decode step took 840 ms on 2 threads; on 1 thread it keeps its own core. So
before each step the runner asks `CpuThreadBudget` how much CPU the other processes used over the last window
(the machine's busy time from /proc/stat less this process's own) and runs on the cores left, rounding a core the
others use less than half of to free. Where /proc/stat cannot be read (not Linux), the count stays torch's.
"""
from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable

# A core the other processes use at least this share of is theirs.
OTHERS_CORE_SHARE = 0.5
# The window the others' use is measured over: long enough for the kernel's 10 ms accounting ticks to average,
# short enough to react within a few decode steps.
WINDOW_S = 0.2
# A window in which this process used less than this many cores was an idle spell (no step ran): what others did
# then (a client starting up, say) cost us nothing and says little about the step to come, so it is not counted.
IDLE_OWN_CORES = 0.25

Sample = tuple[float, float, float]  # (wall s, busy CPU s of our cores, this process's CPU s)


def busy_seconds(cpus: frozenset[int], path: str = "/proc/stat") -> float:
    """CPU seconds the kernel counts as busy (all but idle and iowait) on `cpus` since boot."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    with open(path, encoding="ascii") as stat:
        for line in stat:
            if not line.startswith("cpu"):
                break
            name, *fields = line.split()
            if name == "cpu" or int(name[3:]) not in cpus:
                continue
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values) - values[3] - values[4]
    return total / ticks


class CpuThreadBudget:
    """Asked before each step; the readers are injectable so the rule can be tested on a machine of any load."""

    def __init__(self, max_threads: int, cpus: frozenset[int],
                 read_busy_s: Callable[[], float] | None = None,
                 read_own_s: Callable[[], float] = time.process_time,
                 read_wall_s: Callable[[], float] = time.monotonic) -> None:
        self.max_threads, self.num_cpus = max_threads, len(cpus)
        self._read_busy_s = read_busy_s or (lambda: busy_seconds(cpus))
        self._read_own_s, self._read_wall_s = read_own_s, read_wall_s
        self._samples: collections.deque[Sample] = collections.deque()
        self.threads = max_threads

    @classmethod
    def for_this_process(cls, max_threads: int) -> CpuThreadBudget | None:
        """A budget over the cores this process may run on; None where /proc/stat is not there to read."""
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = frozenset(os.sched_getaffinity(0))
        try:
            busy_seconds(cpus)
        except (OSError, ValueError):
            return None
        return cls(max_threads, cpus)

    def others_cpus(self) -> float | None:
        """Cores' worth of CPU the other processes used over the last window (None until a window has passed, and
        after an idle spell, which starts the measuring afresh)."""
        now = (self._read_wall_s(), self._read_busy_s(), self._read_own_s())
        self._samples.append(now)
        while len(self._samples) > 2 and now[0] - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        then = self._samples[0]
        elapsed = now[0] - then[0]
        if elapsed < WINDOW_S:
            return None
        own_s = now[2] - then[2]
        if own_s < IDLE_OWN_CORES * elapsed:
            self._samples = collections.deque([now])
            return None
        return max(0.0, (now[1] - then[1]) - own_s) / elapsed

    def next_step_threads(self) -> int:
        """The thread count for the step about to run (the last one's until a window of steps has been measured)."""
        others = self.others_cpus()
        if others is not None:
            taken = int(others + 1 - OTHERS_CORE_SHARE)  # a core used OTHERS_CORE_SHARE or more counts whole
            self.threads = max(1, min(self.max_threads, self.num_cpus - taken))
        return self.threads
