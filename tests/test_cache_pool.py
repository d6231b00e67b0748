"""Property-based tests of the unit pool and the per-request tables."""
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from aptserve.cache import CacheKind, CacheManager, UnitPool


def test_allocate_is_all_or_nothing():
    pool = UnitPool(5)
    assert pool.allocate(6, "a") is None
    assert pool.num_free == 5
    assert pool.allocate(5, "a") == [0, 1, 2, 3, 4]
    assert pool.allocate(1, "b") is None
    pool.check_invariants()


def test_freeing_a_unit_one_does_not_own_is_an_error():
    pool = UnitPool(4)
    ids = pool.allocate(2, "a")
    with pytest.raises(RuntimeError, match="owned by 'a'"):
        pool.free(ids, "b")


def test_table_layout_and_sizes():
    cache = CacheManager(num_units=20, block_size=4, units_per_hidden_block=1)
    assert cache.num_units_for(CacheKind.KV, 9) == 6  # 3 blocks x (K unit + V unit)
    assert cache.num_units_for(CacheKind.HIDDEN, 9) == 3
    assert cache.allocate("a", CacheKind.KV, 5)
    assert len(cache.unit_ids("a")) == 4
    assert cache.allocate("a", CacheKind.KV, 8)  # same two blocks: nothing new
    assert len(cache.unit_ids("a")) == 4
    assert cache.allocate("a", CacheKind.KV, 9)
    assert len(cache.unit_ids("a")) == 6
    assert cache.max_tokens(CacheKind.KV) == 40 and cache.max_tokens(CacheKind.HIDDEN) == 80
    with pytest.raises(RuntimeError, match="convert it first"):
        cache.allocate("a", CacheKind.HIDDEN, 9)


def test_free_is_idempotent_and_returns_everything():
    cache = CacheManager(num_units=10, block_size=2)
    cache.allocate("a", CacheKind.KV, 3)
    cache.free("a")
    cache.free("a")
    assert cache.num_free_units == 10
    cache.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / grow / free sequences over both kinds never leak or double-own a unit."""

    def __init__(self):
        super().__init__()
        self.cache = CacheManager(num_units=64, block_size=4, units_per_hidden_block=1)
        self.tokens: dict[str, int] = {}
        self.next_id = 0

    @rule(kind=st.sampled_from(list(CacheKind)), num_tokens=st.integers(1, 80))
    def allocate_new(self, kind, num_tokens):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        free_before = self.cache.num_free_units
        need = self.cache.num_units_for(kind, num_tokens)
        ok = self.cache.allocate(request_id, kind, num_tokens)
        assert ok == (need <= free_before)
        assert self.cache.num_free_units == free_before - (need if ok else 0)
        if ok:
            self.tokens[request_id] = num_tokens

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(1, 20))
    def grow(self, data, extra):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        kind = self.cache.kind_of(request_id)
        if self.cache.allocate(request_id, kind, self.tokens[request_id] + extra):
            self.tokens[request_id] += extra
        assert len(self.cache.unit_ids(request_id)) == self.cache.num_units_for(kind, self.tokens[request_id])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), twice=st.booleans())
    def free(self, data, twice):
        request_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.free(request_id)
        if twice:
            self.cache.free(request_id)
        del self.tokens[request_id]

    @invariant()
    def consistent(self):
        self.cache.check_invariants()
        owned = [u for r in self.tokens for u in self.cache.unit_ids(r)]
        assert len(owned) == len(set(owned)), "a unit is owned twice"
        assert len(owned) + self.cache.num_free_units == self.cache.num_units


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 30), max_size=30))
@settings(max_examples=200, deadline=None)
def test_pool_never_over_commits(requests):
    pool = UnitPool(50)
    held = 0
    for i, n in enumerate(requests):
        got = pool.allocate(n, f"r{i}")
        if got is None:
            assert held + n > 50
        else:
            held += n
        assert pool.num_used == held <= 50
