"""The CPU thread budget: each step runs on the cores the other processes leave free."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from aptserve.runner.cpu_threads import WINDOW_S, CpuThreadBudget, busy_seconds


class FakeMachine:
    """Wall time, busy CPU seconds and this process's CPU seconds, advanced by hand."""

    def __init__(self) -> None:
        self.wall_s = self.busy_s = self.own_s = 0.0

    def run(self, seconds: float, own_cores: float, others_cores: float) -> None:
        self.wall_s += seconds
        self.own_s += own_cores * seconds
        self.busy_s += (own_cores + others_cores) * seconds

    def budget(self, max_threads: int, num_cpus: int) -> CpuThreadBudget:
        return CpuThreadBudget(max_threads, frozenset(range(num_cpus)), read_busy_s=lambda: self.busy_s,
                               read_own_s=lambda: self.own_s, read_wall_s=lambda: self.wall_s)


def steps(machine: FakeMachine, budget: CpuThreadBudget, num: int, others_cores: float) -> list[int]:
    """The thread counts of `num` 25 ms steps, each using the cores it was given, beside the others' load."""
    counts = []
    for _ in range(num):
        counts.append(budget.next_step_threads())
        machine.run(0.025, own_cores=counts[-1], others_cores=others_cores)
    return counts


def test_a_quiet_machine_keeps_every_thread():
    machine = FakeMachine()
    budget = machine.budget(max_threads=2, num_cpus=2)
    assert steps(machine, budget, 20, others_cores=0.02) == [2] * 20


def test_a_busy_core_is_given_up_within_a_window_and_taken_back_when_it_frees():
    machine = FakeMachine()
    budget = machine.budget(max_threads=2, num_cpus=2)
    steps(machine, budget, 8, others_cores=0.0)
    busy = steps(machine, budget, 12, others_cores=0.9)
    assert busy[-1] == 1 and busy.index(1) <= round(WINDOW_S / 0.025) + 1
    assert set(busy[busy.index(1):]) == {1}  # no flapping back while the other process runs
    after = steps(machine, budget, 12, others_cores=0.0)
    assert after[-1] == 2 and set(after[after.index(2):]) == {2}


def test_others_using_less_than_half_a_core_leave_it_ours():
    machine = FakeMachine()
    budget = machine.budget(max_threads=4, num_cpus=4)
    assert steps(machine, budget, 12, others_cores=0.45)[-1] == 4
    assert steps(machine, budget, 12, others_cores=1.6)[-1] == 2  # 1.6 cores: two are theirs
    assert steps(machine, budget, 12, others_cores=8.0)[-1] == 1  # never fewer than one thread


def test_the_count_never_exceeds_torchs_and_holds_until_a_window_has_passed():
    machine = FakeMachine()
    budget = machine.budget(max_threads=2, num_cpus=8)
    assert budget.next_step_threads() == 2
    machine.run(WINDOW_S / 2, own_cores=2, others_cores=7)
    assert budget.next_step_threads() == 2  # half a window: nothing measured yet
    machine.run(WINDOW_S, own_cores=2, others_cores=7)
    assert budget.next_step_threads() == 1
    machine.run(WINDOW_S, own_cores=1, others_cores=0)
    assert budget.next_step_threads() == 2


def test_what_others_did_while_no_step_ran_is_not_counted():
    machine = FakeMachine()
    budget = machine.budget(max_threads=2, num_cpus=2)
    steps(machine, budget, 8, others_cores=0.0)
    machine.run(0.4, own_cores=0.0, others_cores=1.0)  # idle while a client process starts up
    assert steps(machine, budget, 8, others_cores=0.0) == [2] * 8
    machine.run(0.4, own_cores=0.0, others_cores=1.0)  # ... and when it keeps running once the steps resume
    assert steps(machine, budget, 12, others_cores=1.0)[-1] == 1


def test_busy_seconds_reads_only_the_given_cores(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    stat.write_text("cpu  700 0 100 900 50 0 0 0 0 0\n"
                    "cpu0 300 0 50 400 20 0 0 0 0 0\n"
                    "cpu1 400 0 50 500 30 0 0 10 0 0\n"
                    "intr 1 2 3\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert busy_seconds(frozenset({0}), str(stat)) == pytest.approx(350 / ticks)
    assert busy_seconds(frozenset({1}), str(stat)) == pytest.approx(460 / ticks)  # steal is the others' too
    assert busy_seconds(frozenset({0, 1}), str(stat)) == pytest.approx(810 / ticks)


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_a_real_process_spinning_on_a_core_takes_it_from_the_budget():
    num_cpus = len(os.sched_getaffinity(0))
    budget = CpuThreadBudget.for_this_process(max_threads=num_cpus)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started and spinning
        counts = []
        for _ in range(5):
            counts.append(budget.next_step_threads())
            busy_until = time.monotonic() + WINDOW_S  # a step of our own: idle spells are not measured
            while time.monotonic() < busy_until:
                pass
    finally:
        hog.kill()
        hog.wait()
    assert counts[-1] <= num_cpus - 1, counts
