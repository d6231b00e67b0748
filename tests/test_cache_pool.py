"""Property-based tests of the unit pool and the per-request tables."""
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from aptserve.cache import CacheKind, CacheManager, UnitPool
from aptserve.cache.prefix import chain_keys, root_key


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
    with pytest.raises(RuntimeError, match="convert it first"):
        cache.allocate("a", CacheKind.HIDDEN, 9)


def test_free_is_idempotent_and_returns_everything():
    cache = CacheManager(num_units=10, block_size=2)
    cache.allocate("a", CacheKind.KV, 3)
    cache.free("a")
    cache.free("a")
    assert cache.num_free_units == 10
    cache.check_invariants()


def test_the_scratch_is_lent_with_the_first_hidden_table_and_returned_with_the_last():
    cache = CacheManager(num_units=20, block_size=4, units_per_hidden_block=1, num_scratch_units=6)
    assert cache.allocate("kv", CacheKind.KV, 16)  # 8 units: KV tables never borrow the scratch
    assert cache.scratch_unit_ids == () and cache.num_scratch_units_to_take == 6
    # 12 free: a 9-token hidden table (3 units) needs the scratch's 6 besides; 28 tokens (7 units) do not fit.
    assert not cache.can_allocate("a", CacheKind.HIDDEN, 28) and not cache.allocate("a", CacheKind.HIDDEN, 28)
    assert cache.num_free_units == 12 and cache.scratch_unit_ids == ()
    assert cache.allocate("a", CacheKind.HIDDEN, 9)
    assert len(cache.scratch_unit_ids) == 6 and cache.num_free_units == 3 and cache.num_scratch_units_to_take == 0
    assert cache.usage() == {"kv": 8, "hidden": 3, "scratch": 6, "cached": 0, "free": 3}
    assert cache.allocate("b", CacheKind.HIDDEN, 12)  # the scratch is lent already: 3 units
    cache.free("a")
    assert len(cache.scratch_unit_ids) == 6  # b still reads it
    cache.check_invariants()
    cache.free("kv")
    old, new = cache.convert("b", CacheKind.KV, 12)  # the last hidden table goes: so does the scratch
    assert cache.scratch_unit_ids == () and cache.num_free_units == 20 - len(new) == 14
    cache.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / grow / free sequences over both kinds never leak or double-own a unit; the scratch's 5
    units are lent exactly while some request holds hidden rows."""

    def __init__(self):
        super().__init__()
        self.cache = CacheManager(num_units=64, block_size=4, units_per_hidden_block=1, num_scratch_units=5)
        self.tokens: dict[str, int] = {}
        self.next_id = 0

    @rule(kind=st.sampled_from(list(CacheKind)), num_tokens=st.integers(1, 80))
    def allocate_new(self, kind, num_tokens):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        free_before = self.cache.num_free_units
        need = self.cache.num_units_for(kind, num_tokens)
        if kind == CacheKind.HIDDEN:
            need += self.cache.num_scratch_units_to_take
        assert self.cache.can_allocate(request_id, kind, num_tokens) == (need <= free_before)
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
        owned = [u for r in self.tokens for u in self.cache.unit_ids(r)] + list(self.cache.scratch_unit_ids)
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


# --- prefix caching ---------------------------------------------------------------------------------
BLOCK = 4
SYSTEM_PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 12)  # shared starts of prompts


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random add / compute / finish / abort / preempt / convert / evict interleavings over shared prompts: a
    request only ever reads a cached block that holds exactly its own tokens (a block is never freed, rewritten
    or handed out while read), and nothing leaks. Each unit remembers what was last written to it, as the
    runner would write it."""

    def __init__(self):
        super().__init__()
        self.cache = CacheManager(num_units=48, block_size=BLOCK, units_per_hidden_block=1,
                                  enable_prefix_caching=True)
        self.root = root_key("test")
        self.requests: dict[str, dict] = {}  # id -> tokens, kind, computed, keys, live (holds a table)
        self.content: dict[int, tuple] = {}
        self.next_id = 0
        self.num_hit_blocks = 0

    def _keys(self, request) -> list[bytes]:
        chain_keys(request["tokens"], BLOCK, request["keys"], self.root)
        return request["keys"]

    def _check_and_write(self, request_id, request, first_block, last_block, write):
        upb = self.cache.units_per_block(request["kind"])
        unit_ids = self.cache.unit_ids(request_id)
        for index in range(first_block, last_block):
            expected = (request["kind"], tuple(request["tokens"][:(index + 1) * BLOCK]))
            for unit_id in unit_ids[index * upb:(index + 1) * upb]:
                if write:
                    self.content[unit_id] = expected
                else:
                    assert self.content.get(unit_id) == expected, "a shared block holds other tokens"

    @rule(system=st.integers(0, len(SYSTEM_PROMPTS) - 1), suffix=st.lists(st.integers(0, 3), max_size=10),
          kind=st.sampled_from(list(CacheKind)))
    def add(self, system, suffix, kind):
        request_id = f"r{self.next_id}"
        self.next_id += 1
        self.requests[request_id] = {"tokens": SYSTEM_PROMPTS[system] + suffix, "kind": kind, "computed": 0,
                                     "keys": [], "live": False}
        self._admit(request_id)

    def _admit(self, request_id):
        request = self.requests[request_id]
        prefix = self.cache.cached_prefix(request["kind"], self._keys(request), len(request["tokens"]))
        if self.cache.allocate(request_id, request["kind"], len(request["tokens"]), prefix):
            request["live"], request["computed"] = True, len(prefix) * BLOCK
            self.num_hit_blocks += len(prefix)
            self._check_and_write(request_id, request, 0, len(prefix), write=False)

    @precondition(lambda self: any(not r["live"] for r in self.requests.values()))
    @rule(data=st.data())
    def resume(self, data):
        self._admit(data.draw(st.sampled_from(sorted(i for i, r in self.requests.items() if not r["live"]))))

    def _live(self, data):
        request_id = data.draw(st.sampled_from(sorted(i for i, r in self.requests.items() if r["live"])))
        return request_id, self.requests[request_id]

    @precondition(lambda self: any(r["live"] for r in self.requests.values()))
    @rule(data=st.data(), num_tokens=st.integers(1, 9), new_token=st.integers(0, 3))
    def compute(self, data, num_tokens, new_token):
        """A step: compute some of its tokens (a decode appends one first), then register the full blocks."""
        request_id, request = self._live(data)
        if request["computed"] == len(request["tokens"]):
            if not self.cache.allocate(request_id, request["kind"], len(request["tokens"]) + 1):
                return
            request["tokens"].append(new_token)
        before, after = request["computed"], min(len(request["tokens"]), request["computed"] + num_tokens)
        if not self.cache.allocate(request_id, request["kind"], after):  # rows for what the step computes
            return
        request["computed"] = after
        self._check_and_write(request_id, request, before // BLOCK, request["computed"] // BLOCK, write=True)
        self.cache.register(request_id, self._keys(request), request["computed"])

    @precondition(lambda self: any(r["live"] for r in self.requests.values()))
    @rule(data=st.data(), how=st.sampled_from(["finish", "abort", "preempt"]))
    def drop(self, data, how):
        request_id, request = self._live(data)
        self.cache.free(request_id)
        if how == "preempt":
            request["live"], request["computed"] = False, 0
        else:
            del self.requests[request_id]

    @precondition(lambda self: any(r["live"] and r["computed"] for r in self.requests.values()))
    @rule(data=st.data())
    def convert(self, data):
        request_id = data.draw(st.sampled_from(sorted(i for i, r in self.requests.items()
                                                      if r["live"] and r["computed"])))
        request = self.requests[request_id]
        new_kind = CacheKind.HIDDEN if request["kind"] == CacheKind.KV else CacheKind.KV
        if self.cache.convert(request_id, new_kind, request["computed"]) is not None:
            request["kind"] = new_kind  # the runner copies the rows: the new table holds the same tokens
            self._check_and_write(request_id, request, 0, request["computed"] // BLOCK, write=True)
            self.cache.register(request_id, self._keys(request), request["computed"])

    @precondition(lambda self: any(r["live"] and r["computed"] and r["kind"] == CacheKind.KV
                                   for r in self.requests.values()))
    @rule(data=st.data())
    def demote(self, data):
        """KV -> hidden rows in place (preemption by demotion): the runner reads every K/V row, then writes the
        hidden rows, some into the same units."""
        request_id = data.draw(st.sampled_from(sorted(i for i, r in self.requests.items()
                                                      if r["live"] and r["computed"] and r["kind"] == CacheKind.KV)))
        request = self.requests[request_id]
        free_before, held_before = self.cache.num_free_units, self.cache.num_units_held(request_id)
        self._check_and_write(request_id, request, 0, request["computed"] // BLOCK, write=False)
        if self.cache.demote(request_id, request["computed"]) is None:
            assert self.cache.kind_of(request_id) == CacheKind.KV and self.cache.num_free_units == free_before
            return
        request["kind"] = CacheKind.HIDDEN
        assert self.cache.num_units_held(request_id) == self.cache.num_units_for(CacheKind.HIDDEN, request["computed"])
        assert self.cache.num_units_held(request_id) < held_before
        self._check_and_write(request_id, request, 0, request["computed"] // BLOCK, write=True)
        self.cache.register(request_id, self._keys(request), request["computed"])

    @invariant()
    def consistent(self):
        self.cache.check_invariants()
        for request_id, request in self.requests.items():
            assert self.cache.has_table(request_id) == request["live"]


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
# 250 runs x 50 steps: over 10^4 random operations.
TestPrefixCacheMachine.settings = settings(max_examples=250, stateful_step_count=50, deadline=None)


def test_a_prompt_that_extends_a_cached_one_reuses_its_blocks_and_eviction_waits_for_readers():
    cache = CacheManager(num_units=12, block_size=BLOCK, enable_prefix_caching=True)
    root, first, second = root_key("m"), list(range(9)), list(range(8)) + [42, 43]
    first_keys, second_keys = [], []
    chain_keys(first, BLOCK, first_keys, root)
    assert cache.allocate("a", CacheKind.KV, 9)
    cache.register("a", first_keys, 9)  # two full blocks computed: registered
    chain_keys(second, BLOCK, second_keys, root)
    prefix = cache.cached_prefix(CacheKind.KV, second_keys, len(second))
    assert len(prefix) == 2 and cache.unit_ids("a")[:4] == [u for b in prefix for u in b.unit_ids]
    assert cache.cached_prefix(CacheKind.HIDDEN, second_keys, len(second)) == []  # a hit is per cache kind
    assert cache.cached_prefix(CacheKind.KV, first_keys, 8) == prefix[:1]  # the last token is always computed
    assert cache.allocate("b", CacheKind.KV, 10, prefix)
    assert cache.unit_ids("b")[:4] == cache.unit_ids("a")[:4] and cache.num_free_units == 12 - 6 - 2
    cache.free("a")
    cache.free("b")
    assert cache.usage() == {"kv": 0, "hidden": 0, "scratch": 0, "cached": 4, "free": 8}
    assert cache.allocate("c", CacheKind.KV, 20)  # 10 units: one cached block must go, the tail one first
    assert cache.num_evicted_blocks == 1 and cache.cached_prefix(CacheKind.KV, first_keys, 9) == prefix[:1]
    cache.check_invariants()


def test_demotion_keeps_each_own_block_s_first_unit_gives_shared_blocks_new_ones_and_frees_the_rest():
    cache = CacheManager(num_units=14, block_size=BLOCK, units_per_hidden_block=1, enable_prefix_caching=True,
                         num_scratch_units=2)
    keys = []
    chain_keys(list(range(12)), BLOCK, keys, root_key("m"))
    assert cache.allocate("a", CacheKind.KV, 9)
    cache.register("a", keys, 8)  # a's first two blocks are cached: b reads them
    assert cache.allocate("b", CacheKind.KV, 12, cache.cached_prefix(CacheKind.KV, keys, 12))
    b_kv = cache.unit_ids("b")  # [k0 v0 k1 v1] shared, [k2 v2] its own
    assert cache.num_free_units == 14 - 6 - 2 == 6
    old, new = cache.demote("b", 12)
    assert old == b_kv and new[2] == b_kv[4] and len(new) == 3  # its own block keeps its K unit in place
    assert not set(new[:2]) & set(b_kv[:4])  # the shared blocks' rows go to units of its own: a reads those
    assert cache.unit_ids("a")[:4] == b_kv[:4] and cache.kind_of("b") == CacheKind.HIDDEN
    assert len(cache.scratch_unit_ids) == 2  # the first hidden table borrows the scratch
    assert cache.usage() == {"kv": 6, "hidden": 3, "scratch": 2, "cached": 0, "free": 3}  # b's V unit 5 is free
    cache.check_invariants()
    with pytest.raises(RuntimeError, match="only a KV table demotes"):
        cache.demote("b", 12)
    # Where the units a demotion needs (here the scratch's 2) are not there even with what it frees: nothing changes.
    tight = CacheManager(num_units=6, block_size=BLOCK, units_per_hidden_block=1, num_scratch_units=4)
    assert tight.allocate("c", CacheKind.KV, 5) and tight.allocate("d", CacheKind.KV, 4)  # 4 + 2 units
    assert tight.demote("c", 5) is None and tight.kind_of("c") == CacheKind.KV and tight.num_free_units == 0
    tight.check_invariants()
