"""The engine loop's heap trimming: when it trims, and that a trim gives freed heap pages back."""
import ctypes
import os

import pytest

from aptserve.core.heap import HeapTrimmer
from benchmarks.soak import rss_mb


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_trims_when_idle_after_steps_and_periodically_under_load():
    clock = FakeClock()
    heap = HeapTrimmer(every_s=10.0, clock=clock)
    if not heap.available:
        pytest.skip("no malloc_trim in this C library")
    assert not heap.maybe_trim(idle=True)  # nothing ran since start
    heap.stepped()
    assert not heap.maybe_trim(idle=False)  # under load, not yet due
    assert heap.maybe_trim(idle=True)  # fell idle after steps
    assert not heap.maybe_trim(idle=True)  # idle wake-ups do not trim again
    heap.stepped()
    clock.now_s = 9.0
    assert not heap.maybe_trim(idle=False)
    clock.now_s = 10.5
    assert heap.maybe_trim(idle=False)
    assert heap.num_trims == 2


def test_a_trim_returns_freed_holes_of_the_heap():
    heap = HeapTrimmer()
    if not heap.available:
        pytest.skip("no malloc_trim in this C library")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # Freeing a large mmapped block raises glibc's mmap threshold, so the 1 MiB blocks below come from the heap.
    libc.free(libc.malloc(8 << 20))
    blocks = [libc.malloc(1 << 20) for _ in range(256)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)  # resident
    for block in blocks[:-1]:  # the last one pins the heap's top: the rest is a hole a plain free cannot return
        libc.free(block)
    before = rss_mb(os.getpid())
    heap.stepped()
    assert heap.maybe_trim(idle=True)
    after = rss_mb(os.getpid())
    libc.free(blocks[-1])
    assert before - after > 128, f"resident {before:.0f} -> {after:.0f} MB"
